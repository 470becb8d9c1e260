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

/// The Python interpreter of the peer checks, with numpy and onnxruntime: `$COARSEN_PYTHON`
/// (`scripts/test` makes a virtual environment and sets it), else `python3`. Fails with the way
/// to get one when it lacks them: these checks are part of the tests, not optional.
#[allow(dead_code)]
pub fn python() -> String {
    let py = std::env::var("COARSEN_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import numpy, onnxruntime"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{py} lacks numpy or onnxruntime: run the tests with scripts/test (which makes a virtual \
         environment with both), or set COARSEN_PYTHON to a Python that has them"
    );
    py
}
