use std::process::ExitCode;

use clap::Parser;
use spoke_agent::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let what = match cli.command {
        Command::Serve(_) => "spoke-agent serve",
        Command::SimFleet(_) => "spoke-agent sim-fleet",
    };
    eprintln!("{what}: not implemented yet (the IBU engine arrives with the spoke-agent issue)");
    ExitCode::from(2)
}
