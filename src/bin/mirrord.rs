//! mirrord: runs one nbd-mirror resource in the foreground.

use std::process::ExitCode;

use clap::Parser;
use nbd_mirror::cli::mirrord::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = args
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let settings = match nbd_mirror::config::lookup::load_for(
        args.cfg.config.as_deref(),
        args.target.resource.as_deref(),
        args.cfg.node.as_deref(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mirrord: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = nbd_mirror::daemon::setup::check_secret(&settings) {
        eprintln!("mirrord: {e}");
        return ExitCode::from(2);
    }
    match nbd_mirror::daemon::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirrord: {e}");
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}
