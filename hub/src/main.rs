use std::process::ExitCode;

use clap::Parser;
use hub::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws a live view on the terminal: only warnings interrupt it.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        Command::Serve(_) => "info",
    };
    hub::telemetry::init(cli.log_format, default_level);
    let result = match cli.command {
        Command::Serve(args) => hub::serve::run(args).await,
        Command::Demo(args) => hub::demo::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fleet-hub: {err}");
            match err {
                hub::Error::Config(_) | hub::Error::NotImplemented(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
