//! `zdt`: the daemon. `zdt -c supervisor.toml` runs in the foreground and
//! logs to stderr; `zdt check -c FILE` validates a configuration; `zdt
//! import FILE` turns a supervisord.conf or a PM2 process file into one.
//!
//! Exit codes: 0 stopped cleanly / config valid, 1 failed while running,
//! 2 usage or configuration error (including a `LISTEN_FDS` fd that is not
//! a listening stream socket).

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
    /// Supervise one program without a config file: zdt owns the --listen
    /// sockets and passes them to the command (socket activation).
    ///
    /// Example: zdt run --listen tcp://0.0.0.0:8080 --ready notify -- node server.js
    Run {
        /// Address to own and pass as fd 3, 4, ...: tcp://IP:PORT or unix:///path.
        #[arg(long, required = true)]
        listen: Vec<String>,
        /// Readiness: notify, delay=DURATION, or startsecs (up 1 s).
        #[arg(long, default_value = "startsecs")]
        ready: String,
        /// Drain bound for the old generation on restart.
        #[arg(long, default_value = "30s")]
        max_wait: String,
        /// How many copies run.
        #[arg(long, default_value_t = 1)]
        instances: u32,
        /// Program name for zdtctl.
        #[arg(long, default_value = "app")]
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Turn a supervisord.conf or a PM2 process file (ecosystem.config.js,
    /// .json, .yaml) into a supervisor.toml: printed, or written to -o OUT.
    /// What could not be mapped is reported on stderr. Exit 0 done, 2 when
    /// the input cannot be read or parsed (or OUT exists without --force).
    ///
    /// Example: zdt import /etc/supervisor/supervisord.conf -o supervisor.toml
    Import {
        /// supervisord.conf (.conf, .ini), ecosystem.config.js, .json, .yaml/.yml.
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "OUT")]
        output: Option<PathBuf>,
        /// Overwrite OUT if it exists.
        #[arg(long)]
        force: bool,
        /// PM2: take env_NAME over env (as `pm2 start --env NAME`).
        #[arg(long = "env", value_name = "NAME")]
        env: Option<String>,
    },
    /// Whether this binary can take over from a running zdt (run by
    /// `zdtctl upgrade` before it hands over).
    #[command(name = "__upgrade-check", hide = true)]
    UpgradeCheck {
        /// The carried state.
        #[arg(long)]
        state: PathBuf,
    },
    /// The proxy in a process of its own, started by zdt with its channel
    /// as fd 3 (`[supervisor] proxy_process`).
    #[command(name = "__proxy", hide = true)]
    Proxy {
        /// Proxy threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Send sd_notify messages (READY=1, STATUS=...) to $NOTIFY_SOCKET, like
    /// systemd-notify: for workers in languages without unix datagrams (Node).
    Notify {
        /// Messages, e.g. READY=1 "STATUS=serving".
        #[arg(required = true)]
        messages: Vec<String>,
    },
}

/// How long zdt waits at exit for its last log lines to reach stderr.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

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

/// `zdt import`: see [`Cmd::Import`].
fn import(
    file: &std::path::Path,
    output: Option<&std::path::Path>,
    force: bool,
    env: Option<String>,
) -> ExitCode {
    let options = zdt::import::Options { env };
    let imported = match zdt::import::import(file, &options) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match output {
        None => print!("{}", imported.toml),
        Some(out) => {
            use std::io::Write;
            let mut open = std::fs::OpenOptions::new();
            open.write(true);
            if force {
                open.create(true).truncate(true);
            } else {
                open.create_new(true);
            }
            let written = open
                .open(out)
                .and_then(|mut f| f.write_all(imported.toml.as_bytes()));
            if let Err(e) = written {
                let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (it exists: pass --force to overwrite it)"
                } else {
                    ""
                };
                eprintln!("error: cannot write {}: {e}{hint}", out.display());
                return ExitCode::from(2);
            }
        }
    }
    if imported.report.is_empty() {
        eprintln!("zdt import: every option of {} was mapped", file.display());
    } else {
        eprintln!(
            "zdt import: {} thing{} of {} not mapped:",
            imported.report.len(),
            if imported.report.len() == 1 { "" } else { "s" },
            file.display()
        );
        for n in &imported.report {
            eprintln!("  {n}");
        }
    }
    // The result as `zdt check` would read it (relative paths from where
    // it is written).
    let target = match output {
        Some(o) => std::path::absolute(o).unwrap_or_else(|_| o.to_path_buf()),
        None => std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join("supervisor.toml"),
    };
    if let Err(e) = zdt::config::parse(&imported.toml, &target) {
        eprintln!(
            "warning: zdt check does not accept the result yet:\n{}",
            e.render()
        );
    }
    ExitCode::SUCCESS
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
    // After an upgrade every inherited fd is one the previous binary
    // carried on purpose (it cleared close-on-exec on those alone): they are
    // taken and marked close-on-exec as they are adopted, and a fallback to
    // the previous binary needs them open across its exec.
    if std::env::var_os(zdt::upgrade::STATE_VAR).is_some() {
        return;
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

/// The private folder for `zdt run`'s generated config, control socket and
/// logs: $XDG_RUNTIME_DIR/zdt, else $TMPDIR/zdt-UID (TMPDIR defaults to
/// /tmp). Created with mode 0700, or refused when it exists and another user
/// could have made or changed it (see zdt::rundir).
fn runtime_dir() -> Result<PathBuf, String> {
    let (dir, hint) = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => (
            PathBuf::from(d).join("zdt"),
            " (from XDG_RUNTIME_DIR; unset it to use TMPDIR or /tmp)",
        ),
        None => (
            std::env::temp_dir().join(format!("zdt-{}", nix::unistd::geteuid())),
            "",
        ),
    };
    zdt::rundir::private_dir(&dir).map_err(|e| format!("{e}{hint}"))?;
    Ok(dir)
}

/// Writes the configuration `zdt run` stands for, so that it goes through
/// the same validation (and `zdtctl reload` works).
fn write_run_config(cmd: &Cmd) -> Result<PathBuf, String> {
    let Cmd::Run {
        listen,
        ready,
        max_wait,
        instances,
        name,
        command,
    } = cmd
    else {
        return Err("not a run command".into());
    };
    use toml::{Table, Value};
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let dir = runtime_dir()?;
    let pid = std::process::id();
    let mut sup = Table::new();
    sup.insert("control".into(), Value::String(format!("run-{pid}.sock")));
    sup.insert("log_dir".into(), Value::String(format!("run-{pid}-logs")));
    let mut prog = Table::new();
    prog.insert("command".into(), strings(command));
    prog.insert("listen".into(), strings(listen));
    prog.insert("instances".into(), Value::Integer(i64::from(*instances)));
    prog.insert("max_wait".into(), Value::String(max_wait.clone()));
    // Worker output goes to zdt's own stdout and stderr.
    prog.insert("stdout_logfile".into(), Value::String("/dev/stdout".into()));
    prog.insert("stderr_logfile".into(), Value::String("/dev/stderr".into()));
    prog.insert("stdout_logfile_maxbytes".into(), Value::Integer(0));
    prog.insert("stderr_logfile_maxbytes".into(), Value::Integer(0));
    let mut r = Table::new();
    match ready.split_once('=') {
        _ if ready == "startsecs" => {}
        _ if ready == "notify" => {
            r.insert("notify".into(), Value::Boolean(true));
        }
        Some(("delay", d)) => {
            r.insert("delay".into(), Value::String(d.into()));
        }
        _ => {
            return Err(format!(
                "--ready {ready:?}: use notify, delay=DURATION or startsecs"
            ))
        }
    }
    if !r.is_empty() {
        prog.insert("ready".into(), Value::Table(r));
    }
    let mut programs = Table::new();
    programs.insert(name.clone(), Value::Table(prog));
    let mut root = Table::new();
    root.insert("supervisor".into(), Value::Table(sup));
    root.insert("program".into(), Value::Table(programs));
    let text = toml::to_string(&root).map_err(|e| e.to_string())?;
    let file = dir.join(format!("run-{pid}.toml"));
    zdt::rundir::write_new(&file, text.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    Ok(file)
}

/// Why `program`'s command would not be found when spawned, if it would
/// not: a bare name is looked up in PATH (the program's own `PATH` if its
/// environment sets one), an absolute path must be an executable file. A
/// relative path is left alone (it depends on `directory`, which a deploy
/// may not have made yet).
fn missing_command(program: &zdt::config::ProgramConfig) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let cmd = program.command.first()?;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if cmd.starts_with('/') {
        return (!executable(std::path::Path::new(cmd)))
            .then(|| format!("command {cmd:?} is not an executable file"));
    }
    if cmd.contains('/') || cmd.contains('{') {
        return None;
    }
    let path = program
        .environment
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .any(|d| executable(&std::path::Path::new(d).join(cmd)));
    (!found).then(|| format!("command {cmd:?} is not found on PATH ({path})"))
}

/// From here on the process writes to stderr only through this thread: a
/// stalled reader of stderr must not freeze the daemon (or its proxy).
fn stderr_writer() -> Result<zdt::logs::StderrLog, ExitCode> {
    zdt::logs::StderrLog::start().map_err(|e| {
        eprintln!("error: cannot start the stderr writer thread: {e}");
        ExitCode::from(1)
    })
}

/// zdt's log on `stderr`, filtered by `ZDT_LOG` (default `info`): one
/// JSON object a line when `ZDT_LOG_FORMAT=json` (`[supervisor] log_format`
/// sets it, and the proxy process inherits it), otherwise text, coloured
/// only when stderr is a terminal.
fn init_tracing(stderr: &zdt::logs::StderrLog) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZDT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(stderr.clone())
        .with_env_filter(filter);
    if std::env::var_os("ZDT_LOG_FORMAT").is_some_and(|f| f == "json") {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// `zdt __proxy`: serves the orders zdt sends on the channel (fd 3) until
/// zdt closes it, shuts the proxy down, or retires it.
fn proxy_process(threads: usize) -> ExitCode {
    // zdt alone tells this process to stop (over the channel), and its
    // death kills it (PR_SET_PDEATHSIG): a `pkill zdt`, or a signal meant
    // for zdt, must not end the proxy while zdt drains through it.
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGUSR2,
    ] {
        // SAFETY: SIG_IGN installs no handler code; this runs before any
        // other thread exists.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let channel = match zdt::proxy::take_channel() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let stderr = match stderr_writer() {
        Ok(s) => s,
        Err(code) => return code,
    };
    init_tracing(&stderr);
    zdt::fds::raise_limit();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| rt.block_on(zdt::proxy::serve_process(channel, threads)));
    if let Err(e) = result {
        stderr.write_bytes(format!("error: proxy process: {e}\n").as_bytes());
        stderr.flush(EXIT_FLUSH);
        return ExitCode::from(1);
    }
    stderr.flush(EXIT_FLUSH);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    sanitize_fds();
    let args = Args::parse();
    if let Some(Cmd::Proxy { threads }) = &args.command {
        return proxy_process(*threads);
    }
    zdt::upgrade::remember_start();
    if let Some(Cmd::Notify { messages }) = &args.command {
        return notify(messages);
    }
    if let Some(Cmd::Import {
        file,
        output,
        force,
        env,
    }) = &args.command
    {
        return import(file, output.as_deref(), *force, env.clone());
    }
    if let Some(Cmd::UpgradeCheck { state }) = &args.command {
        return zdt::upgrade::check(state);
    }
    // An upgrade in place: the previous binary's state and configuration
    // (a state this binary cannot use execs the previous binary again).
    let found = match zdt::upgrade::take_from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let (resumed, carried_config) = match found {
        zdt::upgrade::Found::State {
            carried,
            config,
            failed,
        } => (Some((*carried, failed)), Some(*config)),
        zdt::upgrade::Found::Nothing => (None, None),
    };
    let run_file = match &args.command {
        Some(Cmd::Run { .. }) if carried_config.is_some() => {
            carried_config.as_ref().map(|c| c.file.clone())
        }
        Some(cmd @ Cmd::Run { .. }) => match write_run_config(cmd) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let config = match carried_config {
        Some(c) => c,
        None => match load(run_file.as_deref().or(args.config.as_deref())) {
            Ok(c) => c,
            Err(code) => return code,
        },
    };
    if let Some(Cmd::Check) = args.command {
        for p in config.programs.values() {
            if let Some(why) = missing_command(p) {
                eprintln!("warning: program {}: {why}", p.name);
            }
            for path in p.watch.iter().flat_map(|w| &w.paths) {
                if !path.exists() {
                    eprintln!(
                        "warning: program {}: watch path {} does not exist (it is not watched)",
                        p.name,
                        path.display()
                    );
                }
            }
        }
        if config.programs.is_empty() {
            eprintln!(
                "warning: {} has no programs; `zdtctl reload` refuses it unless given --allow-empty",
                config.file.display()
            );
        }
        println!(
            "{}: ok ({} program{})",
            config.file.display(),
            config.programs.len(),
            if config.programs.len() == 1 { "" } else { "s" }
        );
        return ExitCode::SUCCESS;
    }
    if config.supervisor.log_format == zdt::config::LogFormat::Json {
        // Still one thread: nothing reads the environment concurrently.
        std::env::set_var("ZDT_LOG_FORMAT", "json");
    }
    // What zdt's own service manager passed it, taken while zdt has one
    // thread (the variables are removed from its environment).
    let systemd = match zdt::activation::take_from_env() {
        Ok(listen_fds) => zdt::daemon::Systemd {
            notifier: zdt::sdnotify::Notifier::from_env(),
            listen_fds,
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let stderr = match stderr_writer() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let upgraded = resumed.is_some();
    if let Some(name) = config
        .programs
        .keys()
        .next()
        .filter(|_| run_file.is_some() && !upgraded)
    {
        stderr.write_bytes(format!(
            "zdt: control socket {sock}\nzdt: restart without downtime with: zdtctl -s {sock} restart {name}\n",
            sock = config.supervisor.control.display()
        ).as_bytes());
    }
    init_tracing(&stderr);
    // The last lines get a bounded chance to reach a slow reader.
    let fail = |text: String| {
        stderr.write_bytes(format!("error: {text}\n").as_bytes());
        stderr.flush(EXIT_FLUSH);
        ExitCode::from(1)
    };
    // The main thread forks every worker (and execs an upgrade) and lives
    // as long as zdt; the runtime runs on threads of its own.
    let (spawner, reaper, forker) = zdt::spawn::start();
    let stopper = spawner.clone();
    let daemon = std::thread::Builder::new()
        .name("zdt-runtime".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"));
            let result = runtime.and_then(|runtime| {
                let result = runtime.block_on(async move {
                    let signals = zdt::signals::daemon_signals()
                        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
                    zdt::daemon::run(config, spawner, reaper, signals, systemd, resumed)
                        .await
                        .map_err(|e| e.to_string())
                });
                // Every program has stopped (or a second stop signal said to
                // exit now): do not wait for tasks still busy with workers
                // that die with zdt.
                runtime.shutdown_timeout(std::time::Duration::from_millis(200));
                result
            });
            stopper.stop();
            result
        });
    let result = match daemon {
        Ok(daemon) => {
            forker.run();
            daemon
                .join()
                .unwrap_or_else(|_| Err("the runtime thread panicked".into()))
        }
        Err(e) => Err(format!("cannot start the runtime thread: {e}")),
    };
    if let Some(f) = &run_file {
        let _ = std::fs::remove_file(f);
    }
    match result {
        Ok(()) => {
            stderr.flush(EXIT_FLUSH);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
