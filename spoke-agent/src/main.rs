use std::process::ExitCode;

use clap::Parser;
use spoke_agent::cli::{Cli, Command};
use spoke_agent::run;
use spoke_core::Error;

/// glibc's allocator spent half of `sim-fleet`'s CPU time in its own bookkeeping (ten
/// thousand agents in one process fragment its heap); mimalloc does not.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    fleet_server::init_logs(cli.log_format, "info");
    let result = match cli.command {
        Command::Serve(args) => run::serve(args).await,
        Command::SimFleet(args) => run::sim_fleet(args).await,
        Command::InitMonitor(args) => run::init_monitor(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("spoke-agent: {err}");
            match err {
                Error::Invalid(_) => ExitCode::from(2),
                Error::Unavailable(_) | Error::Internal { .. } => ExitCode::FAILURE,
            }
        }
    }
}
