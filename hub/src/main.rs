use std::process::ExitCode;

use clap::Parser;
use hub::cli::{Cli, Command};

/// glibc's allocator took a fifth of the hub's CPU at fleet scale (`fleet-bench`: reports,
/// pushes and the engine's passes allocate a lot, briefly); jemalloc does the same work
/// for less, with no more memory (mimalloc was as fast but held more: see docs/benchmarks.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws a live view on the terminal, the client prints answers: only warnings
    // interrupt them.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    fleet_server::init_logs(cli.log_format, default_level);
    let command = match cli.command {
        // The client's commands: their own answers and exit codes.
        Command::Rollout(cmd) => return client(hub::ctl::rollout(cmd).await),
        Command::Cluster(cmd) => return client(hub::ctl::cluster(cmd).await),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "fleet-hub", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        other => other,
    };
    // Before anything is started: from here on SIGTERM and Ctrl-C let the hub stop what it
    // started (its private Postgres above all) instead of killing it on the spot.
    let shutdown = match hub::shutdown::Shutdown::install() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("fleet-hub: cannot handle SIGTERM and SIGINT: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::Serve(args) => hub::serve::run(*args, shutdown).await,
        Command::Demo(args) => hub::demo::run(args, shutdown).await,
        Command::Openapi => {
            let doc = hub::http::openapi::document();
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            Ok(())
        }
        Command::Rollout(_) | Command::Cluster(_) | Command::Completion { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fleet-hub: {err}");
            match err {
                hub::Error::Invalid(_) => ExitCode::from(2),
                hub::Error::Interrupted(signal) => ExitCode::from(signal.exit_code()),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// A client command's exit: its own code, or 1 with the hub's message.
fn client(result: Result<u8, String>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(why) => {
            eprintln!("fleet-hub: {why}");
            ExitCode::FAILURE
        }
    }
}
