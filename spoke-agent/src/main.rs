use std::process::ExitCode;

use clap::Parser;
use spoke_agent::cli::{Cli, Command, LogFormat};
use spoke_agent::run::{self, RunError};
use tracing_subscriber::EnvFilter;

/// glibc's allocator spent half of `sim-fleet`'s CPU time in its own bookkeeping (ten
/// thousand agents in one process fragment its heap); mimalloc does not.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal turns them into colours, never in a file or pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Serve(args) => run::serve(args).await,
        Command::SimFleet(args) => run::sim_fleet(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("spoke-agent: {err}");
            match err {
                RunError::Usage(_) | RunError::NotImplemented(_) => ExitCode::from(2),
                RunError::Failed(_) => ExitCode::FAILURE,
            }
        }
    }
}
