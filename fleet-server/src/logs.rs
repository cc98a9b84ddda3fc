//! Log set-up of both programs: text for people, JSON for log pipelines, on stderr.
//! `RUST_LOG` refines the level (the default is the caller's).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Postgres relays NOTICEs (`relation "_sqlx_migrations" already exists, skipping` at every
/// start) and sqlx logs them at INFO: noise for an operator, kept back unless asked for.
const QUIET: &str = "sqlx::postgres::notice=warn";

pub fn init_logs(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},{QUIET}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal turns them into colours, never in a file or pipe.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
