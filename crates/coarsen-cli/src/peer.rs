//! ONNX Runtime timed beside coarsen's own paths, when the Python environment that
//! `scripts/bench-peers` makes is present: every saving coarsen reports for itself then sits
//! next to what a user of the most common engine already gets on the same network.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use coarsen_infer::onnx::{to_onnx, OnnxOptions};
use coarsen_infer::Network;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The timing worker of scripts/bench-peers (ONNX Runtime side), run with `python -c`.
const WORKER: &str = include_str!("../../../scripts/peers/worker.py");

/// The ONNX Runtime environment of scripts/bench-peers.
pub struct OrtPeer {
    python: PathBuf,
}

impl OrtPeer {
    /// `$COARSEN_PEERS_DIR/ort` (default `~/.cache/coarsen/peers/ort`) when its Python imports
    /// onnxruntime; otherwise why not, as a note for the user.
    pub fn find() -> std::result::Result<OrtPeer, String> {
        let dir = std::env::var_os("COARSEN_PEERS_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/coarsen/peers"))
            })
            .ok_or("no peer environment (HOME is not set)")?;
        let python = dir.join("ort").join("bin").join("python");
        let ok = crate::signals::unblocked_in_child(&mut Command::new(&python))
            .args(["-c", "import numpy, onnxruntime"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(OrtPeer { python })
        } else {
            Err(format!(
                "ONNX Runtime not timed: no peer environment at {} (scripts/bench-peers makes it; \
                 COARSEN_PEERS_DIR points elsewhere)",
                dir.join("ort").display()
            ))
        }
    }

    /// Median milliseconds of `reps` forward passes of `net` (exported to ONNX, BatchNorm
    /// folded) on a random batch of `batch` images, `threads` intra-op threads, after one
    /// warm-up pass.
    pub fn time(&self, net: &Network, batch: usize, reps: usize, threads: usize) -> Result<f64> {
        let dir = tempfile::tempdir().context("a temporary directory for the ONNX model")?;
        let model = dir.path().join("model.onnx");
        let bytes = to_onnx(
            net,
            &OnnxOptions {
                fold_batch_norm: true,
            },
        )?;
        std::fs::write(&model, bytes).with_context(|| format!("writing {}", model.display()))?;
        let [c, h, w] = net.input();
        let mut rng = ChaCha8Rng::seed_from_u64(0x0e7);
        let x: Vec<f32> = (0..batch * c * h * w)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let input = dir.path().join("input.npy");
        crate::inputs::write_npy(&input, &[batch, c, h, w], &x)?;
        let mut child = crate::signals::unblocked_in_child(&mut Command::new(&self.python))
            .arg("-c")
            .arg(WORKER)
            .args(["--engine", "ort", "--threads", &threads.to_string()])
            .arg("--model")
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("--logits-out")
            .arg(dir.path().join("logits.npy"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.python.display()))?;
        let result = (|| -> Result<f64> {
            let mut stdin = child.stdin.take().context("the worker's stdin")?;
            let mut out = BufReader::new(child.stdout.take().context("the worker's stdout")?);
            let mut line = String::new();
            let mut reply = |cmd: Option<String>| -> Result<serde_json::Value> {
                if let Some(c) = cmd {
                    writeln!(stdin, "{c}")?;
                    stdin.flush()?;
                }
                line.clear();
                if out.read_line(&mut line)? == 0 {
                    bail!("the ONNX Runtime worker ended early");
                }
                Ok(serde_json::from_str(&line)?)
            };
            let ready = reply(None)?;
            if ready.get("ready") != Some(&serde_json::Value::Bool(true)) {
                bail!("the ONNX Runtime worker is not ready: {ready}");
            }
            reply(Some("run 1".into()))?;
            let r = reply(Some(format!("run {}", reps.max(1))))?;
            let mut times: Vec<f64> = r
                .get("times_ms")
                .and_then(|t| t.as_array())
                .context("the worker's times")?
                .iter()
                .filter_map(|v| v.as_f64())
                .collect();
            let _ = writeln!(stdin, "quit");
            if times.is_empty() {
                bail!("the ONNX Runtime worker returned no times");
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        })();
        let output = child.wait_with_output()?;
        match result {
            Ok(ms) => Ok(ms),
            Err(e) => Err(e.context(format!(
                "ONNX Runtime worker: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
        }
    }
}
