//! `zdt`: the daemon. `zdt -c supervisor.toml` runs in the foreground and
//! logs to stderr; `zdt check -c FILE` validates a configuration.
//!
//! Exit codes: 0 stopped cleanly / config valid, 1 failed while running,
//! 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zdt",
    version,
    about = "Zero-downtime process supervisor for web servers"
)]
struct Args {
    /// Configuration file (default: $ZDT_CONFIG, ./supervisor.toml, /etc/zdt/supervisor.toml).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate the configuration and exit: 0 if valid, 2 if not.
    Check,
    /// Send sd_notify messages (READY=1, STATUS=...) to $NOTIFY_SOCKET, like
    /// systemd-notify: for workers in languages without unix datagrams (Node).
    Notify {
        /// Messages, e.g. READY=1 "STATUS=serving".
        #[arg(required = true)]
        messages: Vec<String>,
    },
}

fn notify(messages: &[String]) -> ExitCode {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        eprintln!("error: NOTIFY_SOCKET is not set (is this running under zdt with ready = {{ notify = true }}?)");
        return ExitCode::from(1);
    };
    match zdt::notify::send(&path, &messages.join("\n")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot notify {}: {e}", path.to_string_lossy());
            ExitCode::from(1)
        }
    }
}

fn load(explicit: Option<&std::path::Path>) -> Result<zdt::config::Config, ExitCode> {
    let loaded = zdt::config::find_config(explicit).and_then(|p| zdt::config::load(&p));
    loaded.map_err(|e| {
        eprintln!("{}", e.render());
        ExitCode::from(2)
    })
}

/// Marks every fd zdt inherited (beyond stdio) close-on-exec, so that none
/// of them reaches a worker (PITFALLS 8), and makes sure fds 0-2 are open, so
/// that no socket zdt opens later lands on a stdio number.
fn sanitize_fds() {
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            let _ = nix::fcntl::open(
                "/dev/null",
                nix::fcntl::OFlag::O_RDWR,
                nix::sys::stat::Mode::empty(),
            );
        }
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

fn main() -> ExitCode {
    sanitize_fds();
    let args = Args::parse();
    if let Some(Cmd::Notify { messages }) = &args.command {
        return notify(messages);
    }
    let config = match load(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(Cmd::Check) = args.command {
        println!(
            "{}: ok ({} program{})",
            config.file.display(),
            config.programs.len(),
            if config.programs.len() == 1 { "" } else { "s" }
        );
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZDT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // The spawner thread forks every worker and must live as long as zdt.
    let (spawner, reaper) = match zdt::spawn::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot start the spawner thread: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        let signals = zdt::signals::daemon_signals()
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        zdt::daemon::run(config, spawner, reaper, signals)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
