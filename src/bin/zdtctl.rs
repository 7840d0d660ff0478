//! `zdtctl`: the control client.
//!
//! Exit codes: 0 done; 1 the operation failed; 2 usage or configuration
//! error; 3 the daemon cannot be reached (not running, or permission denied).
//!
//! When the reader of stdout goes away (`zdtctl status | head -1`), output
//! stops quietly: `tail -f` ends with 0, any other command still waits for
//! its outcome and exits with its code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use zdt::control::client::{Client, ClientError};
use zdt::control::proto::{Command, ErrorBody, Outcome, ReleaseRow, Reply};
use zdt::state::{now_ms, Hold, ProgramSnapshot};

#[derive(Parser)]
#[command(name = "zdtctl", version, about = "Control a running zdt")]
struct Args {
    /// Configuration file that names the control socket (default: $ZDT_CONFIG,
    /// ./supervisor.toml, /etc/zdt/supervisor.toml).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Control socket path (instead of reading the configuration).
    #[arg(short = 's', long = "socket", global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables and progress lines.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show programs and instances (all, or the ones named).
    Status {
        /// Refresh a live view (CPU %, memory, requests per second, in
        /// flight, per instance) until interrupted, like `pm2 monit`.
        #[arg(short = 'w', long)]
        watch: bool,
        /// With --watch: time between refreshes.
        #[arg(long, default_value = "1s", requires = "watch")]
        interval: String,
        /// With --watch: stop after this many refreshes.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
        /// Program names, NAME:N, globs such as web*, or all.
        targets: Vec<String>,
    },
    /// Start programs; waits until they run.
    Start {
        /// Program names, NAME:N, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Stop programs: stop_signal, then SIGKILL after kill_timeout.
    Stop {
        /// Program names, NAME:N, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Restart programs; waits until the new generation runs.
    Restart {
        /// Return as soon as the restart was accepted.
        #[arg(long)]
        no_wait: bool,
        /// Exit 1 when the restart worked but an old generation did not
        /// drain in time (SIGKILLed at max_wait, requests cut).
        #[arg(long)]
        strict: bool,
        /// Proxy mode: start the new generation as a canary for PERCENT % of
        /// new clients (sticky), beside the old one; returns once it serves.
        /// End it with `promote` or `rollback`.
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=99))]
        canary: Option<u8>,
        /// Program names, NAME:N, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// End a canary: its generation takes all traffic, the old one drains
    /// and stops; waits until it is gone.
    Promote {
        /// Program names, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Send a signal to the process group of each instance.
    Signal {
        /// Program name, NAME:N, glob, or all.
        target: String,
        /// Signal name or number: HUP, SIGUSR1, 10.
        signal: String,
    },
    /// Change the number of instances of a running program: new ones start,
    /// the highest-numbered stop (proxy mode: out of the routes first, their
    /// requests finish), the others run on. Waits until done; lasts until a
    /// reload applies the file's `instances`.
    Scale {
        /// One program.
        target: String,
        /// The new number of instances (1 to 1024).
        #[arg(value_parser = clap::value_parser!(u32).range(1..=1024))]
        instances: u32,
    },
    /// Print the pids of a program's instances.
    Pid {
        /// Program name, NAME:N, glob, or all.
        target: String,
    },
    /// Print the end of an instance's output.
    Tail {
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// How many lines of history (as far back as zdt's 64 KiB ring of
        /// the instance's output reaches).
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// How many bytes of history, instead of lines.
        #[arg(long, conflicts_with = "lines")]
        bytes: Option<usize>,
        /// NAME:N for one instance; NAME for all of the program's, each line
        /// prefixed with NAME:N when it has more than one.
        target: String,
    },
    /// Follow the output of several programs, every instance, stdout and
    /// stderr, interleaved; each line prefixed with PROGRAM:N (coloured on a
    /// terminal), like `pm2 logs`.
    Logs {
        /// Print the last lines and exit instead of following.
        #[arg(long)]
        no_follow: bool,
        /// How many lines of history from each instance's stream.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// stdout only.
        #[arg(long, conflicts_with = "err")]
        out: bool,
        /// stderr only.
        #[arg(long)]
        err: bool,
        /// Programs, globs or groups (default: all).
        names: Vec<String>,
    },
    /// Proxy mode: /health says 503 at once; new requests get 503 (after
    /// drain_delay when it is set) while in-flight ones finish.
    Drain {
        /// Program names, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// End a drain.
    Undrain {
        /// Program names, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Proxy mode: hold new requests inside zdt (not refused, not forwarded)
    /// until `resume`; requests in flight finish. Returns once none is in
    /// flight (fails if some still are after max_wait).
    Pause {
        /// How long one request may be held; then it gets 503 (default 30s).
        #[arg(long, value_name = "DURATION")]
        max_pause: Option<String>,
        /// Program names, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Proxy mode: end a pause (held requests go on, in order) or a maintenance.
    Resume {
        /// Program names, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Proxy mode: answer new requests 503 with a message until `resume`.
    Maintenance {
        /// The 503's body (text/plain; a default message without it).
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
        /// Program names, globs, or all.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Read the configuration again and apply the difference.
    Reload {
        /// Accept a configuration with no programs (this stops them all).
        #[arg(long)]
        allow_empty: bool,
        /// Only print what a reload would add, remove and restart
        /// (supervisord's `reread`); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deploy a release: fetch SRC into a new release folder, run the build
    /// hooks, switch `current`, restart every program on the deploy root
    /// without downtime. Exits 0 once the new release serves.
    Deploy {
        /// A program with a deploy root.
        target: String,
        /// A folder, a .tar.gz/.tgz/.tar/.zip archive, or git+URL#REF.
        #[arg(long, value_name = "SRC")]
        from: String,
        /// Proxy mode: hold new requests while the migrate hooks run and
        /// the new release starts (for database migrations).
        #[arg(long)]
        pause: bool,
        /// With --pause: a request held longer gets 503 (default 30s).
        #[arg(long, value_name = "DURATION", requires = "pause")]
        max_pause: Option<String>,
        /// Proxy mode: serve the new release to PERCENT % of new clients
        /// (sticky) beside the old one until `promote` or `rollback`.
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=99))]
        canary: Option<u8>,
    },
    /// List the releases of a program's deploy root.
    Releases {
        /// A program with a deploy root.
        target: String,
    },
    /// While a canary runs: roll it back (the old generation takes all
    /// traffic again; waits until the canary is gone). Otherwise go back to
    /// an earlier release (default: the previous good one), without
    /// downtime and without a build.
    Rollback {
        /// A program (with a deploy root, for a release rollback).
        target: String,
        /// The release id (see `zdtctl releases`).
        release: Option<String>,
    },
    /// Stop all programs and exit zdt.
    Shutdown,
    /// Replace zdt's binary in place without stopping anything: same pid,
    /// workers and sockets kept (SIGUSR2 does the same). Exits 1 with the
    /// reason when the old binary serves on.
    Upgrade {
        /// The new binary (default: the path zdt was started from, where a
        /// package manager puts the new version).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Print the daemon's version.
    Version,
    /// Print a shell completion script for zdtctl: `zdtctl completions bash
    /// > /etc/bash_completion.d/zdtctl` (needs no daemon).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print zdtctl's man page (roff): `zdtctl man > zdtctl.1` (needs no
    /// daemon).
    Man,
}

/// zdtctl's stdout, which may be closed by its reader at any time.
#[derive(Default)]
struct Out {
    /// Set once a write failed: nothing more is written.
    gone: AtomicBool,
    /// Poked when stdout went away, so that `tail -f` can end.
    closed: tokio::sync::Notify,
    /// A write failed for another reason than a reader that went away.
    failed: AtomicBool,
}

impl Out {
    /// Writes `text` unless stdout is gone; a write error ends all output
    /// (quietly when the reader went away).
    fn print(&self, text: &str) {
        if self.gone.load(Ordering::Relaxed) {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            self.gone.store(true, Ordering::Relaxed);
            self.closed.notify_one();
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                self.failed.store(true, Ordering::Relaxed);
                err_line(&format!("error: cannot write to stdout: {e}"));
            }
        }
    }
}

/// `println!` to [`Out`].
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {
        $out.print(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// One line on stderr; a stderr nobody reads is not worth a panic.
fn err_line(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

fn socket_path(args: &Args) -> Result<PathBuf, ExitCode> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    zdt::config::find_config(args.config.as_deref())
        .and_then(|p| zdt::config::control_socket(&p))
        .map_err(|e| {
            err_line(&e.render().to_string());
            ExitCode::from(EXIT_USAGE)
        })
}

fn requests(cmd: &Cmd) -> Vec<Command> {
    match cmd {
        Cmd::Status { targets, .. } if targets.is_empty() => {
            vec![Command::Status { target: None }]
        }
        Cmd::Status { targets, .. } => targets
            .iter()
            .map(|t| Command::Status {
                target: Some(t.clone()),
            })
            .collect(),
        Cmd::Start { targets } => targets
            .iter()
            .map(|t| Command::Start { target: t.clone() })
            .collect(),
        Cmd::Stop { targets } => targets
            .iter()
            .map(|t| Command::Stop { target: t.clone() })
            .collect(),
        Cmd::Restart {
            no_wait,
            targets,
            canary,
            ..
        } => targets
            .iter()
            .map(|t| Command::Restart {
                target: t.clone(),
                no_wait: *no_wait,
                canary: *canary,
            })
            .collect(),
        Cmd::Promote { targets } => targets
            .iter()
            .map(|t| Command::Promote { target: t.clone() })
            .collect(),
        Cmd::Signal { target, signal } => vec![Command::Signal {
            target: target.clone(),
            signal: signal.clone(),
        }],
        Cmd::Scale { target, instances } => vec![Command::Scale {
            target: target.clone(),
            instances: *instances,
        }],
        Cmd::Pid { target } => vec![Command::Pid {
            target: target.clone(),
        }],
        Cmd::Tail {
            follow,
            stderr,
            lines,
            bytes,
            target,
        } => vec![Command::Tail {
            target: target.clone(),
            stderr: *stderr,
            follow: *follow,
            bytes: *bytes,
            lines: bytes.is_none().then_some(*lines),
        }],
        Cmd::Drain { targets } => targets
            .iter()
            .map(|t| Command::Drain { target: t.clone() })
            .collect(),
        Cmd::Undrain { targets } => targets
            .iter()
            .map(|t| Command::Undrain { target: t.clone() })
            .collect(),
        Cmd::Pause { max_pause, targets } => targets
            .iter()
            .map(|t| Command::Pause {
                target: t.clone(),
                max_pause: max_pause.clone(),
            })
            .collect(),
        Cmd::Resume { targets } => targets
            .iter()
            .map(|t| Command::Resume { target: t.clone() })
            .collect(),
        Cmd::Maintenance { message, targets } => targets
            .iter()
            .map(|t| Command::Maintenance {
                target: t.clone(),
                message: message.clone(),
            })
            .collect(),
        Cmd::Reload {
            allow_empty,
            dry_run,
        } => vec![Command::Reload {
            allow_empty: *allow_empty,
            dry_run: *dry_run,
        }],
        Cmd::Deploy {
            target,
            from,
            pause,
            max_pause,
            canary,
        } => vec![Command::Deploy {
            target: target.clone(),
            from: from.clone(),
            pause: *pause,
            max_pause: max_pause.clone(),
            canary: *canary,
            base: std::env::current_dir()
                .ok()
                .map(|d| d.to_string_lossy().into_owned()),
        }],
        Cmd::Releases { target } => vec![Command::Releases {
            target: target.clone(),
        }],
        Cmd::Rollback { target, release } => vec![Command::Rollback {
            target: target.clone(),
            release: release.clone(),
        }],
        Cmd::Shutdown => vec![Command::Shutdown],
        // Sent by `upgrade`, which waits for the new binary.
        Cmd::Upgrade { .. } => Vec::new(),
        Cmd::Version => vec![Command::Version],
        // Answered without the daemon, in main.
        Cmd::Completions { .. } | Cmd::Man => Vec::new(),
        // Several connections at once, in `streams`.
        Cmd::Logs { .. } => Vec::new(),
    }
}

/// `completions` and `man`: written from clap's own description of zdtctl.
fn offline(cmd: &Cmd) -> Option<ExitCode> {
    use clap::CommandFactory;
    let mut command = Args::command();
    let mut out = Vec::new();
    match cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut command, "zdtctl", &mut out);
        }
        Cmd::Man => {
            if let Err(e) = clap_mangen::Man::new(command).render(&mut out) {
                err_line(&format!("error: cannot write the man page: {e}"));
                return Some(ExitCode::from(EXIT_FAILED));
            }
        }
        _ => return None,
    }
    // A reader that went away (`| head`) is not an error.
    let _ = std::io::stdout().write_all(&out);
    Some(ExitCode::SUCCESS)
}

fn fmt_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn print_status(out: &Out, programs: &[ProgramSnapshot]) {
    let now = now_ms();
    // Request columns only when a proxy-mode program is shown.
    let proxied = programs.iter().any(|p| p.requests.is_some());
    let mut head = vec![
        "PROGRAM",
        "INST",
        "GEN",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
    ];
    if proxied {
        head.extend(["INFLIGHT", "SERVED", "502", "CUT"]);
    }
    head.push("INFO");
    let mut rows: Vec<Vec<String>> = vec![head.into_iter().map(String::from).collect()];
    for p in programs {
        for i in &p.instances {
            let uptime = i
                .started_ms
                .filter(|_| i.pid.is_some())
                .map(|t| fmt_duration(now.saturating_sub(t)))
                .unwrap_or_else(|| {
                    format!("({} ago)", fmt_duration(now.saturating_sub(i.since_ms)))
                });
            let mut info: Vec<String> = Vec::new();
            if let Some(e) = &i.error {
                info.push(e.clone());
            }
            if let Some(s) = &i.status_text {
                info.push(s.clone());
            }
            if i.log_dropped_bytes > 0 {
                info.push(format!("{} log bytes dropped", i.log_dropped_bytes));
            }
            if let Some(r) = &i.release {
                info.push(format!("release {r}"));
            }
            if let Some(w) = &i.drain_warning {
                info.push(format!("last drain: {w}"));
            }
            let mut row = vec![
                p.name.clone(),
                i.instance.to_string(),
                i.generation.to_string(),
                i.state.to_string(),
                i.pid.map_or("-".into(), |p| p.to_string()),
                uptime,
                i.restarts.to_string(),
                i.last_exit.as_ref().map_or("-".into(), |e| e.to_string()),
            ];
            if proxied {
                match &i.requests {
                    Some(r) => {
                        row.extend([r.inflight, r.served, r.failed, r.cut].map(|n| n.to_string()))
                    }
                    None => row.extend(["-", "-", "-", "-"].map(String::from)),
                }
            }
            row.push(info.join("; "));
            rows.push(row);
        }
    }
    print_table(out, rows);
    for p in programs {
        if let Some(c) = &p.canary {
            print_canary(out, &p.name, c);
        }
    }
    for p in programs {
        if let Some(w) = &p.socket_warning {
            outln!(out, "{}: warning: {w}", p.name);
        }
        if let Some(w) = &p.deploy_watch {
            let when = w.last_check_ms.map_or("not checked yet".to_string(), |t| {
                format!("checked {} ago", fmt_duration(now.saturating_sub(t)))
            });
            outln!(
                out,
                "{}: watch {}: {when}: {}",
                p.name,
                w.source,
                w.outcome.as_deref().unwrap_or("-")
            );
        }
        if let Some(r) = &p.requests {
            outln!(
                out,
                "{}: {} in flight, {} served, {} answered 502 ({} cut at max_wait), {} answered 503",
                p.name, r.inflight, r.served, r.failed, r.cut, r.unavailable
            );
        }
        match &p.hold {
            Some(Hold::Paused {
                since_ms,
                max_pause_ms,
                held,
            }) => outln!(
                out,
                "{}: paused for {} (each request held at most {}), {held} held; `zdtctl resume {}` lets them go",
                p.name,
                fmt_duration(now.saturating_sub(*since_ms)),
                if *max_pause_ms < 1000 {
                    format!("{max_pause_ms}ms")
                } else {
                    fmt_duration(*max_pause_ms)
                },
                p.name
            ),
            Some(Hold::Maintenance { since_ms, message }) => outln!(
                out,
                "{}: in maintenance for {}, answering 503 {:?}; `zdtctl resume {}` ends it",
                p.name,
                fmt_duration(now.saturating_sub(*since_ms)),
                message.trim_end(),
                p.name
            ),
            None => {}
        }
    }
}

/// A canary's two generations side by side.
fn print_canary(out: &Out, name: &str, c: &zdt::state::CanaryStatus) {
    let sticky = match &c.header {
        Some(h) => format!("{h} hash, else cookie"),
        None => "cookie".to_string(),
    };
    outln!(
        out,
        "{name}: canary: gen {} takes {} % of new clients (sticky by {sticky}); promote: zdtctl promote {name}; roll back: zdtctl rollback {name}",
        c.canary.generation,
        c.percent
    );
    let p99 = |g: &zdt::state::GenerationTraffic| {
        g.p99_us.map_or("-".to_string(), |us| {
            format!("{:.1} ms", us as f64 / 1000.0)
        })
    };
    let rows = [
        ["", "GEN", "REQUESTS", "5XX", "P99"].map(String::from),
        [
            "stable".into(),
            c.stable.generation.to_string(),
            c.stable.requests.to_string(),
            c.stable.errors_5xx.to_string(),
            p99(&c.stable),
        ],
        [
            "canary".into(),
            c.canary.generation.to_string(),
            c.canary.requests.to_string(),
            c.canary.errors_5xx.to_string(),
            p99(&c.canary),
        ],
    ];
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        outln!(out, "  {}", line.join("  ").trim_end());
    }
}

fn print_outcome(out: &Out, outcome: &Outcome) {
    match outcome {
        Outcome::Status { programs } => print_status(out, programs),
        Outcome::Done {
            message, warnings, ..
        } => {
            outln!(out, "{message}");
            for w in warnings {
                err_line(&format!("warning: {w}"));
            }
        }
        Outcome::Pids { pids } => {
            for p in pids {
                outln!(out, "{}", p.pid);
            }
        }
        Outcome::Reloaded {
            added,
            removed,
            changed,
            unchanged,
            dry_run,
        } => {
            let list = |v: &Vec<String>| {
                if v.is_empty() {
                    "-".into()
                } else {
                    v.join(", ")
                }
            };
            if *dry_run {
                outln!(
                    out,
                    "a reload would add {}; remove {}; restart {} (changed); leave {} (nothing was changed)",
                    list(added),
                    list(removed),
                    list(changed),
                    list(unchanged)
                );
            } else {
                outln!(
                    out,
                    "reloaded: added {}; removed {}; changed {}; unchanged {}",
                    list(added),
                    list(removed),
                    list(changed),
                    list(unchanged)
                );
            }
        }
        Outcome::Tail { data } => out.print(data),
        Outcome::Version {
            version,
            pid,
            proxy_pid,
            ..
        } => match proxy_pid {
            Some(p) => outln!(out, "zdt {version} (pid {pid}, proxy process {p})"),
            None => outln!(out, "zdt {version} (pid {pid})"),
        },
        Outcome::ShuttingDown => outln!(out, "zdt is stopping all programs and will exit"),
        Outcome::Releases { root, releases } => print_releases(out, root, releases),
    }
}

fn print_releases(out: &Out, root: &str, releases: &[ReleaseRow]) {
    if releases.is_empty() {
        outln!(
            out,
            "no releases in {root}/releases yet (zdtctl deploy NAME --from SRC)"
        );
        return;
    }
    let now = now_ms();
    let mut rows: Vec<Vec<String>> = vec![[
        "RELEASE", "STATE", "CREATED", "SOURCE", "COMMIT", "BUILD", "SIZE", "INFO",
    ]
    .map(String::from)
    .to_vec()];
    for r in releases {
        rows.push(vec![
            r.id.clone(),
            r.state.clone(),
            r.created_ms.map_or("-".into(), |t| {
                format!("{} ago", fmt_duration(now.saturating_sub(t)))
            }),
            r.source.clone().unwrap_or_else(|| "-".into()),
            r.commit
                .as_deref()
                .map_or("-".into(), |c| c.chars().take(12).collect()),
            r.build_ms
                .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
            r.size_bytes.map_or("-".into(), human_bytes),
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    print_table(out, rows);
}

fn human_bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

/// Prints rows as columns padded to their widest cell.
fn print_table(out: &Out, rows: Vec<Vec<String>>) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        outln!(out, "{}", line.join("  ").trim_end());
    }
}

fn print_error(out: &Out, e: &ErrorBody, json: bool) {
    if json {
        let v = serde_json::json!({ "error": e });
        outln!(out, "{v}");
        return;
    }
    err_line(&format!("error: {}", e.message));
    if let Some(h) = &e.hint {
        for line in h.lines() {
            err_line(&format!("  {line}"));
        }
    }
}

async fn run(args: Args, socket: PathBuf) -> u8 {
    let out = Out::default();
    let code = requests_to(&out, &args, &socket).await;
    if out.failed.load(Ordering::Relaxed) {
        code.max(EXIT_FAILED)
    } else {
        code
    }
}

/// How long `upgrade` waits for the new binary to answer after the exec.
const UPGRADE_ANSWER: std::time::Duration = std::time::Duration::from_secs(30);

/// `upgrade`: asks for it, then (the connection ends with the exec) asks
/// the new binary how it went, by a token of this run's.
async fn upgrade(
    out: &Out,
    json: bool,
    socket: &std::path::Path,
    binary: Option<&std::path::Path>,
) -> u8 {
    let binary = match binary.map(std::path::absolute).transpose() {
        Ok(b) => b.map(|b| b.to_string_lossy().into_owned()),
        Err(e) => {
            err_line(&format!("error: --binary: {e}"));
            return EXIT_USAGE;
        }
    };
    let token = format!("{}-{}", std::process::id(), now_ms());
    let mut client = match Client::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            report_client_error(out, &e, json);
            return EXIT_UNREACHABLE;
        }
    };
    let asked = client
        .request(
            Command::Upgrade {
                binary,
                token: Some(token.clone()),
            },
            |reply| {
                if let Reply::Progress { message } = reply {
                    if !json {
                        outln!(out, "{message}");
                    }
                }
            },
        )
        .await;
    match asked {
        // The old binary said why not; it serves on.
        Ok(Err(body)) => {
            print_error(out, &body, json);
            return EXIT_FAILED;
        }
        // The exec ended the connection (an answer would be unusual).
        Ok(Ok(_)) | Err(ClientError::Closed | ClientError::Io(_)) => {}
        Err(e) => {
            report_client_error(out, &e, json);
            return EXIT_UNREACHABLE;
        }
    }
    let deadline = std::time::Instant::now() + UPGRADE_ANSWER;
    let mut last = String::from("no answer");
    while std::time::Instant::now() < deadline {
        // The control socket stays open across the exec: a connection made
        // meanwhile waits in its backlog for the new binary.
        let answer = match Client::connect(socket).await {
            Ok(mut c) => c.request(Command::Version, |_| {}).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Ok(Outcome::Version {
                upgrade: Some(rec),
                pid,
                ..
            })) if rec.token == token => {
                if json {
                    outln!(out, "{}", serde_json::json!({ "upgrade": rec, "pid": pid }));
                } else if rec.ok {
                    outln!(
                        out,
                        "upgraded: zdt {} -> zdt {}, pid {pid} unchanged, {} ms",
                        rec.from,
                        rec.to,
                        rec.ms
                    );
                } else {
                    err_line(&format!(
                        "error: the upgrade failed; zdt {} (pid {pid}) serves on: {}",
                        rec.to,
                        rec.error.as_deref().unwrap_or("no reason recorded")
                    ));
                }
                return if rec.ok { 0 } else { EXIT_FAILED };
            }
            Ok(Ok(_)) => last = "zdt answers but has no record of this upgrade".into(),
            Ok(Err(body)) => last = body.message,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    err_line(&format!(
        "error: no outcome of the upgrade within {UPGRADE_ANSWER:?}: {last}"
    ));
    EXIT_FAILED
}

async fn requests_to(out: &Out, args: &Args, socket: &std::path::Path) -> u8 {
    if let Cmd::Upgrade { binary } = &args.command {
        return upgrade(out, args.json, socket, binary.as_deref()).await;
    }
    if let Some(code) = streams(out, args, socket).await {
        return code;
    }
    if let Cmd::Status {
        watch: true,
        interval,
        count,
        targets,
    } = &args.command
    {
        return watch_status(out, socket, targets, interval, *count).await;
    }
    let mut client = match Client::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            report_client_error(out, &e, args.json);
            return EXIT_UNREACHABLE;
        }
    };
    let follow = matches!(args.command, Cmd::Tail { follow: true, .. });
    let mut code = 0;
    for req in requests(&args.command) {
        let json = args.json;
        let request = client.request(req, |reply| match reply {
            Reply::Progress { message } if !json => outln!(out, "{message}"),
            Reply::Log { data } => out.print(data),
            _ => {}
        });
        let result = tokio::select! {
            r = request => r,
            // Nobody reads what tail -f would print.
            () = out.closed.notified(), if follow => return code,
        };
        match result {
            Ok(Ok(outcome)) => {
                let strict = matches!(args.command, Cmd::Restart { strict: true, .. });
                if let Outcome::Done { warnings, .. } = &outcome {
                    if strict && !warnings.is_empty() {
                        code = code.max(EXIT_FAILED);
                    }
                }
                if json {
                    match serde_json::to_string(&outcome) {
                        Ok(s) => outln!(out, "{s}"),
                        Err(e) => err_line(&format!("error: {e}")),
                    }
                } else {
                    print_outcome(out, &outcome);
                }
            }
            Ok(Err(body)) => {
                print_error(out, &body, json);
                code = code.max(if body.kind == "bad_request" {
                    EXIT_USAGE
                } else {
                    EXIT_FAILED
                });
            }
            Err(e) => {
                report_client_error(out, &e, json);
                return EXIT_UNREACHABLE;
            }
        }
    }
    code
}

/// `logs`, and `tail NAME` of a program with several instances: one
/// connection per stream, lines prefixed. None for any other command.
async fn streams(out: &Out, args: &Args, socket: &std::path::Path) -> Option<u8> {
    use zdt::control::follow::{self, Stream};
    let (targets, lines, follow, which): (Vec<Option<String>>, usize, bool, &[bool]) =
        match &args.command {
            Cmd::Logs {
                no_follow,
                lines,
                out: o,
                err,
                names,
            } => (
                if names.is_empty() {
                    vec![None]
                } else {
                    names.iter().cloned().map(Some).collect()
                },
                *lines,
                !no_follow,
                match (o, err) {
                    (true, _) => &[false],
                    (_, true) => &[true],
                    _ => &[false, true],
                },
            ),
            Cmd::Tail {
                follow,
                stderr,
                lines,
                bytes: None,
                target,
            } if !target.contains(':') => (
                vec![Some(target.clone())],
                *lines,
                *follow,
                if *stderr { &[true] } else { &[false] },
            ),
            _ => return None,
        };
    let mut instances = Vec::new();
    for t in targets {
        match follow::instances(socket, t).await {
            Ok(Ok(list)) => instances.extend(list),
            Ok(Err(body)) => {
                print_error(out, &body, args.json);
                return Some(EXIT_FAILED);
            }
            Err(e) => {
                report_client_error(out, &e, args.json);
                return Some(EXIT_UNREACHABLE);
            }
        }
    }
    instances.sort();
    instances.dedup();
    if matches!(args.command, Cmd::Tail { .. }) {
        let programs: std::collections::BTreeSet<&str> =
            instances.iter().map(|(p, _)| p.as_str()).collect();
        if programs.len() != 1 || instances.len() < 2 {
            // One program of one instance: the plain tail, unprefixed.
            return None;
        }
    }
    let streams: Vec<Stream> = instances
        .iter()
        .flat_map(|(program, instance)| {
            which.iter().map(|&stderr| Stream {
                program: program.clone(),
                instance: *instance,
                stderr,
            })
        })
        .collect();
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let print = |text: &str| {
        if !text.is_empty() {
            out.print(text);
        }
    };
    let run = follow::follow(socket, &streams, lines, follow, colour, &print);
    let result = tokio::select! {
        r = run => r,
        // Nobody reads what would be printed.
        () = out.closed.notified() => return Some(0),
    };
    Some(match result {
        Ok(Ok(())) => 0,
        Ok(Err(body)) => {
            print_error(out, &body, args.json);
            EXIT_FAILED
        }
        Err(e) => {
            report_client_error(out, &e, args.json);
            EXIT_UNREACHABLE
        }
    })
}

/// `status --watch`: the instances of `targets` with CPU, memory and
/// request rates, redrawn every `interval` (on a terminal; otherwise one
/// table after another) until interrupted, stdout goes away, or `count`.
async fn watch_status(
    out: &Out,
    socket: &std::path::Path,
    targets: &[String],
    interval: &str,
    count: Option<u64>,
) -> u8 {
    use std::io::IsTerminal;
    use zdt::control::monitor::{human_bytes, Monitor};
    let every = match zdt::config::parse_duration(interval) {
        Ok(d) if d >= std::time::Duration::from_millis(100) => d,
        Ok(_) => {
            err_line("error: --interval: use at least 100ms");
            return EXIT_USAGE;
        }
        Err(e) => {
            err_line(&format!("error: --interval: {e}"));
            return EXIT_USAGE;
        }
    };
    let mut client = match Client::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            report_client_error(out, &e, false);
            return EXIT_UNREACHABLE;
        }
    };
    let terminal = std::io::stdout().is_terminal();
    let mut monitor = Monitor::default();
    let mut ticker = tokio::time::interval(every);
    let mut shown = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = out.closed.notified() => return 0,
        }
        let queries: Vec<Option<String>> = if targets.is_empty() {
            vec![None]
        } else {
            targets.iter().cloned().map(Some).collect()
        };
        let mut programs = Vec::new();
        for target in queries {
            match client.request(Command::Status { target }, |_| {}).await {
                Ok(Ok(Outcome::Status { programs: p })) => programs.extend(p),
                Ok(Ok(_)) => {}
                Ok(Err(body)) => {
                    print_error(out, &body, false);
                    return EXIT_FAILED;
                }
                Err(e) => {
                    report_client_error(out, &e, false);
                    return EXIT_UNREACHABLE;
                }
            }
        }
        let usage = zdt::admin::procstat::groups();
        let rows = monitor.rows(&programs, &usage, std::time::Instant::now());
        let dash = || "-".to_string();
        let mut table = vec![[
            "PROGRAM", "INST", "GEN", "STATE", "PID", "CPU%", "MEM", "PROCS", "REQ/S", "INFLIGHT",
            "RESTARTS",
        ]
        .map(String::from)
        .to_vec()];
        for r in &rows {
            table.push(vec![
                r.program.clone(),
                r.instance.to_string(),
                r.generation.to_string(),
                r.state.to_string(),
                r.pid.map_or_else(dash, |p| p.to_string()),
                r.cpu_percent.map_or_else(dash, |c| format!("{c:.1}")),
                r.rss_bytes.map_or_else(dash, human_bytes),
                r.processes.map_or_else(dash, |n| n.to_string()),
                r.requests_per_s.map_or_else(dash, |q| format!("{q:.0}")),
                r.inflight.map_or_else(dash, |n| n.to_string()),
                r.restarts.to_string(),
            ]);
        }
        if terminal {
            // Home and clear, then the table: a redraw in place.
            out.print("\x1b[H\x1b[2J");
        } else if shown > 0 {
            out.print("\n");
        }
        let when = chrono::Local::now().format("%H:%M:%S");
        outln!(out, "zdt status every {interval}, {when} (Ctrl-C to quit)");
        print_table(out, table);
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return 0;
        }
    }
}

fn report_client_error(out: &Out, e: &ClientError, json: bool) {
    let kind = match e {
        ClientError::PermissionDenied { .. } => "permission_denied",
        _ => "unreachable",
    };
    print_error(out, &ErrorBody::new(kind, e.to_string()), json);
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = offline(&args.command) {
        return code;
    }
    let socket = match socket_path(&args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            err_line(&format!("error: cannot start the runtime: {e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    ExitCode::from(runtime.block_on(run(args, socket)))
}

#[cfg(test)]
mod cli {
    /// clap's own checks of every subcommand (two options with one short
    /// name, a conflict naming no option...), which otherwise fire only when
    /// that subcommand is used.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
