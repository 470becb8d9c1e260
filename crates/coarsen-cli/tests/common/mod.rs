//! Running the real `coarsen` binary, shared by the integration tests.

use std::process::{Command, Output};

/// Runs `coarsen` with `args`.
pub fn coarsen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coarsen"))
        .args(args)
        .output()
        .expect("the coarsen binary runs")
}

/// Runs a command that must succeed; its standard output.
pub fn ok(args: &[&str]) -> String {
    let out = coarsen(args);
    assert!(
        out.status.success(),
        "coarsen {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
