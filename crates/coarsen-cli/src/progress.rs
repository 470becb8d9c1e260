//! Progress bars on standard error (hidden when it is not a terminal or with `--quiet`).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `len` steps labelled `what`.
pub fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), target(quiet));
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A spinner labelled `what`, for work of unknown length.
pub fn spinner(what: &str, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, target(quiet));
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} {spinner} {elapsed_precise} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}
