//! mirrord: runs one nbd-mirror resource in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Serve one replicated resource over NBD and mirror it to its peer.
#[derive(Parser)]
#[command(name = "mirrord", version)]
struct Args {
    /// The resource's config file (TOML).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// This node's name (default: $MIRROR_NODE, else the host name).
    #[arg(long)]
    node: Option<String>,
    /// Log filter, e.g. "info" or "nbd_mirror=debug" (default: $RUST_LOG, else info).
    #[arg(long)]
    log_level: Option<String>,
}

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
    let settings = match nbd_mirror::config::load(&args.config, args.node.as_deref()) {
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
