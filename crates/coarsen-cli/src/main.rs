//! The `coarsen` command-line tool. Run `coarsen --help` for the subcommands.

mod args;
mod chart;
mod commands;
mod inputs;
mod pattern;
mod peer;
mod picture;
mod progress;
mod signals;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

// Training allocates and frees many large activation buffers per step; mimalloc keeps them
// mapped, where the system allocator returns them to the kernel and faults them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`| head`) instead
    // of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before any thread starts: SIGINT and SIGTERM go to one waiting thread.
    signals::install();
    let cli = Cli::parse();
    // Every command's parallel work runs on rayon's global pool (`bench` builds its own).
    if let Err(e) = coarsen_kernels::threads::global(cli.pin) {
        eprintln!("error: cannot start the worker threads: {e}");
        return ExitCode::FAILURE;
    }
    let result = match &cli.command {
        Command::Prune(a) => commands::prune::run(a, cli.quiet),
        Command::Convert(a) => commands::convert::run(a, cli.quiet),
        Command::Inspect(a) => commands::inspect::run(a, cli.quiet),
        Command::Bench(a) => commands::bench::run(a, cli.quiet, cli.pin),
        Command::Synth(a) => commands::synth::run(a),
        Command::Demo(a) => commands::demo::run(a, cli.quiet),
        Command::Train(a) => commands::train::run(a, cli.quiet),
        Command::Eval(a) => commands::eval::run(a, cli.quiet),
        Command::Export(a) => commands::export::run(a, cli.quiet),
        Command::Predict(a) => commands::predict::run(a, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
