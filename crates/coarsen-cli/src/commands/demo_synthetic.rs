//! `coarsen demo --synthetic`: the structuring pipeline on an example model, written to a report directory.
//!
//! An example CIFAR network (random initial weights) is pruned by global magnitude, and its mask
//! is converted into every pattern. Each result is verified, reported and drawn.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use coarsen_core::patterns::{
    BlockConfig, ChannelConfig, GroupConfig, NmConfig, PartCount, ShuffledConfig,
};
use coarsen_core::{MatrixView, Pattern, Report, Scope, Selector, WeightFile};

use crate::args::DemoArgs;
use crate::commands::convert::convert_with_progress;
use crate::commands::prune::prune_file;
use crate::commands::write_json;
use crate::picture;

/// The conversions the demo runs: (label, pattern).
fn conversions() -> Vec<(&'static str, Pattern)> {
    vec![
        ("channel", Pattern::Channel(ChannelConfig::default())),
        ("channel+", Pattern::Channel(ChannelConfig::refill_plus())),
        ("group", Pattern::Group(GroupConfig::default())),
        (
            "group-auto",
            Pattern::Group(GroupConfig {
                parts: PartCount::Auto,
                ..Default::default()
            }),
        ),
        (
            "shuffled-block",
            Pattern::ShuffledBlock(ShuffledConfig::default()),
        ),
        ("block", Pattern::Block(BlockConfig::default())),
        ("nm", Pattern::Nm(NmConfig::default())),
        (
            "nm-permute",
            Pattern::Nm(NmConfig {
                permute: true,
                ..Default::default()
            }),
        ),
    ]
}

/// Runs `coarsen demo`.
pub fn run(args: &DemoArgs, quiet: bool) -> Result<()> {
    let dir = &args.out;
    std::fs::create_dir_all(dir.join("pictures")).map_err(|e| coarsen_core::Error::io(dir, e))?;
    let arch = coarsen_core::zoo::by_name(&args.model, 10)?;
    eprintln!(
        "[1/3] {}: random initial weights (seed {})",
        arch.name, args.seed
    );
    let weights_path = dir.join("weights.safetensors");
    WeightFile::write_f32(&weights_path, &arch.init(args.seed)?)?;
    let weights = WeightFile::read(&weights_path)?;

    // Structure-LTH's layer set: every conv but the first; the classifier stays dense.
    let names: Vec<String> = arch
        .convs
        .iter()
        .skip(1)
        .map(|c| regex_escape(&c.name))
        .collect();
    let sel = Selector::new(Some(&format!("^({})$", names.join("|"))), None)?;
    eprintln!(
        "[2/3] global magnitude pruning to sparsity {} over {} convolutions",
        args.sparsity,
        names.len()
    );
    let masks = prune_file(
        &weights,
        None,
        &sel,
        args.sparsity,
        Scope::Global,
        coarsen_core::Granularity::Weight,
    )?;
    let mask_path = dir.join("mask.safetensors");
    masks.write(&mask_path)?;

    let pictured = arch.convs[arch.convs.len() / 2].name.clone();
    let mut reports: Vec<(&str, Report)> = Vec::new();
    let list = conversions();
    for (i, (label, pattern)) in list.iter().enumerate() {
        eprintln!("[3/3] ({}/{}) convert to {label}", i + 1, list.len());
        let inputs = coarsen_core::ConvertInputs {
            masks: &masks,
            weights: Some(&weights),
            scores: None,
            selector: &sel,
            target: None,
        };
        let conv = convert_with_progress(&inputs, pattern, args.seed, quiet)?;
        conv.masks.write(dir.join(format!("{label}.safetensors")))?;
        write_json(&dir.join(format!("{label}.json")), &conv.report)?;
        if let (Some(before), Some(after)) = (masks.get(&pictured), conv.masks.get(&pictured)) {
            let view = MatrixView::of(&after.shape)
                .unwrap_or_else(|| MatrixView::matrix(1, after.data.len()));
            let b = coarsen_core::Mask::from_bytes(view.rows, view.cols, before.data.clone())?;
            let a = coarsen_core::Mask::from_bytes(view.rows, view.cols, after.data.clone())?;
            let perm = conv
                .masks
                .metadata
                .as_ref()
                .and_then(|m| m.layers.get(&pictured))
                .and_then(|l| l.col_perm.clone());
            let order = picture::structure_order(&a, view, perm.as_deref());
            picture::draw(
                &[&b, &a],
                &order,
                &dir.join("pictures").join(format!("{label}.png")),
            )?;
        }
        reports.push((label, conv.report));
    }
    let md = summary(&arch.name, args, &pictured, &reports);
    coarsen_core::io::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    print!("{md}");
    eprintln!("wrote the report to {}", dir.join("report.md").display());
    Ok(())
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$#&-~".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

fn summary(model: &str, args: &DemoArgs, pictured: &str, reports: &[(&str, Report)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# coarsen demo: structuring a {model} mask\n");
    let _ = writeln!(
        s,
        "Random initial weights (seed {}), global magnitude mask at sparsity {} over the \
         convolutions after the first. Each row converts that mask into a pattern; every \
         structured layer was verified against the pattern's property.\n",
        args.seed, args.sparsity
    );
    let _ = writeln!(
        s,
        "| pattern | structured layers | density in | density out | recall | retained magnitude | time (ms) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (label, r) in reports {
        let t = &r.total;
        let _ = writeln!(
            s,
            "| {label} | {}/{} | {:.4} | {:.4} | {:.3} | {} | {:.0} |",
            t.structured,
            t.layers,
            t.density_in,
            t.density_out,
            t.recall,
            t.retained_magnitude
                .map_or("-".into(), |m| format!("{m:.3}")),
            t.time_ms
        );
    }
    let _ = writeln!(
        s,
        "\nPictures of `{pictured}` before (left) and after (right) each conversion are in \
         `pictures/`, rows and columns reordered so the structure shows. Per-layer reports are \
         the JSON files beside this one."
    );
    let _ = Path::new(pictured);
    s
}
