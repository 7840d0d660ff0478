//! Test harness: a real `zdt` daemon in a temporary directory, driven with the
//! real `zdtctl`, and helpers that wait on events with a deadline.
//!
//! [`Daemon`] kills what it started when dropped; if the test is failing it
//! prints zdt's stderr and the worker logs first.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod load;

use zdt::state::{InstanceSnapshot, InstanceState, ProgramSnapshot};

/// Path of a binary built by this package.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "zdt" => PathBuf::from(env!("CARGO_BIN_EXE_zdt")),
        "zdtctl" => PathBuf::from(env!("CARGO_BIN_EXE_zdtctl")),
        "zdt-demo" => PathBuf::from(env!("CARGO_BIN_EXE_zdt-demo")),
        "zdt-load" => PathBuf::from(env!("CARGO_BIN_EXE_zdt-load")),
        other => panic!("no binary {other}"),
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// Polls `f` until it returns Some, or panics after `timeout` with `what` and
/// the last value seen.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a process exists (and is not a zombie).
/// The `zdt __proxy` children of `parent` (more than one while an upgrade
/// retires the previous binary's).
pub fn proxy_children_of(parent: u32) -> Vec<u32> {
    let mut found: Vec<u32> = children_of(parent)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"__proxy"))
        })
        .collect();
    found.sort_unstable();
    found
}

/// The children of `parent` (from each process's ppid in /proc).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// The `zdt __proxy` child of `parent`, if one runs (the first, if two do).
pub fn proxy_child_of(parent: u32) -> Option<u32> {
    proxy_children_of(parent).first().copied()
}

pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends a signal to a pid.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// One HTTP/1.1 GET on a new connection: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Established connections to `port` (from /proc/net/tcp: the sockets
/// whose remote end is that port), e.g. zdt's to a worker's private port.
pub fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

/// A running zdt in its own temporary directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    /// RLIMIT_NOFILE (soft, hard) zdt is started with, if not ours.
    nofile: Option<(u64, u64)>,
    /// What a service manager would give zdt (see [`Daemon::start_with`]).
    manager: Manager,
}

/// Variables and a listening socket for zdt, as systemd passes them.
#[derive(Clone, Debug, Default)]
pub struct Manager {
    /// Added to zdt's environment.
    pub env: Vec<(String, String)>,
    /// An fd of the test's that zdt gets as fd 3, with LISTEN_PID set to
    /// zdt's pid (the test sets LISTEN_FDS itself).
    pub fd3: Option<std::os::fd::RawFd>,
    /// A command zdt runs under (`unshare --pid --fork --kill-child ...`:
    /// [`Daemon::pid`] is then the wrapper's pid, and killing it must end
    /// zdt, hence `--kill-child`).
    pub wrap: Vec<String>,
}

impl Manager {
    /// `env` as owned pairs, and `fd3`.
    pub fn new(env: &[(&str, &str)], fd3: Option<std::os::fd::RawFd>) -> Self {
        Manager {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fd3,
            wrap: Vec::new(),
        }
    }

    /// A command that runs zdt with `args`, the variables and fd 3: through
    /// `sh -c 'LISTEN_PID=$$ exec zdt …'` when there is an fd (exec keeps
    /// the pid, so LISTEN_PID is zdt's).
    pub fn command(&self, args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = match self.fd3 {
            Some(fd) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
                    .arg(bin("zdt"))
                    .args(args);
                use std::os::unix::process::CommandExt;
                // SAFETY: dup2 and fcntl only, both async-signal-safe.
                unsafe {
                    c.pre_exec(move || {
                        if fd == 3 {
                            if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        } else if libc::dup2(fd, 3) != 3 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                c
            }
            None => match self.wrap.split_first() {
                Some((first, rest)) => {
                    let mut c = Command::new(first);
                    c.args(rest).arg(bin("zdt")).args(args);
                    c
                }
                None => {
                    let mut c = Command::new(bin("zdt"));
                    c.args(args);
                    c
                }
            },
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// The `[supervisor]` table every test config starts with.
pub fn header() -> String {
    "[supervisor]\ncontrol = \"run/zdt.sock\"\nlog_dir = \"logs\"\n\n".to_string()
}

/// Runs `cmd` (stdin closed; stdout and stderr as the caller set them) and
/// returns its output, or None if it has not ended within `limit` (it is
/// then killed). The output is read while waiting, so a large one cannot
/// stall the command and pass for a hang.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let child = cmd.stdin(Stdio::null()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Some(out.expect("command output")),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            let _ = rx.recv();
            None
        }
    }
}

/// A `[program.NAME]` table running the demo worker with `args`.
pub fn demo_program(name: &str, args: &[&str], extra: &str) -> String {
    let mut argv = vec![format!("{:?}", bin("zdt-demo").display().to_string())];
    argv.extend(args.iter().map(|a| format!("{a:?}")));
    format!(
        "[program.{name}]\ncommand = [{}]\n{extra}\n",
        argv.join(", ")
    )
}

impl Daemon {
    /// Writes `config` (placeholders: none) and starts zdt on it; waits until
    /// the control socket answers.
    pub fn start(config: &str) -> Daemon {
        Self::start_with_nofile(config, None)
    }

    /// Like [`Daemon::start`], with zdt's open-files limit (RLIMIT_NOFILE)
    /// set to (soft, hard) before it runs.
    pub fn start_with_nofile(config: &str, nofile: Option<(u64, u64)>) -> Daemon {
        Self::start_full(config, nofile, Manager::default())
    }

    /// Like [`Daemon::start`], as a service manager would start zdt: with
    /// `manager`'s variables and fd 3 (kept for [`Daemon::start_again`]).
    pub fn start_with(config: &str, manager: Manager) -> Daemon {
        Self::start_full(config, None, manager)
    }

    fn start_full(config: &str, nofile: Option<(u64, u64)>, manager: Manager) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("supervisor.toml");
        std::fs::write(&path, config).expect("write config");
        let mut d = Daemon {
            dir,
            config: path,
            child: None,
            nofile,
            manager,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let stderr =
            std::fs::File::create(self.dir.path().join("zdt.stderr")).expect("stderr file");
        let mut cmd = self
            .manager
            .command(&["-c".as_ref(), self.config.as_os_str()]);
        cmd.env("ZDT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            let rl = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe; `rl` was built before fork.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn zdt");
        self.child = Some(child);
        wait_for(
            "the control socket to answer",
            Duration::from_secs(10),
            || {
                if let Some(code) = self.try_exit() {
                    panic!("zdt exited with {code:?} at start:\n{}", self.stderr());
                }
                let out = self.ctl(&["version"]);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            },
        );
    }

    /// Starts zdt again on the same config and directory (after it exited
    /// or was killed); waits until the control socket answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "zdt is still running");
        self.spawn();
    }

    /// zdt's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("zdt is running")
    }

    /// The pid of zdt's proxy process (`zdt __proxy`, its child), once it
    /// runs.
    pub fn proxy_pid(&self, timeout: Duration) -> u32 {
        let zdt = self.pid();
        wait_for("zdt's proxy process", timeout, || {
            proxy_child_of(zdt).ok_or_else(|| format!("no `zdt __proxy` child of {zdt}"))
        })
    }

    /// The exit status if zdt has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for zdt to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let st = wait_for("zdt to exit", timeout, || {
            self.try_exit().ok_or_else(|| "running".into())
        });
        self.child = None;
        st
    }

    /// What zdt wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("zdt.stderr")).unwrap_or_default()
    }

    /// Rewrites the config file.
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config, config).expect("write config");
    }

    /// Runs zdtctl with `-c CONFIG` and `args`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("zdtctl"))
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run zdtctl")
    }

    /// Starts `zdtctl ARGS` in a thread (for orders that wait, such as a
    /// restart that drains); join it for the output.
    pub fn ctl_in_background(&self, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let mut cmd = Command::new(bin("zdtctl"));
        cmd.arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null());
        std::thread::spawn(move || cmd.output().expect("run zdtctl"))
    }

    /// Runs `zdtctl --json ARGS` and parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        let text = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or_else(|e| {
            panic!(
                "zdtctl {args:?} printed no JSON ({e}): stdout {text:?} stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    /// All program snapshots.
    pub fn status(&self) -> Vec<ProgramSnapshot> {
        let (code, v) = self.ctl_json(&["status"]);
        assert_eq!(code, 0, "status failed: {v}");
        serde_json::from_value(v["programs"].clone()).expect("status JSON")
    }

    /// One instance's snapshot.
    pub fn instance(&self, program: &str, instance: u32) -> InstanceSnapshot {
        self.status()
            .into_iter()
            .find(|p| p.name == program)
            .and_then(|p| p.instances.into_iter().find(|i| i.instance == instance))
            .unwrap_or_else(|| panic!("no {program}:{instance} in status"))
    }

    /// A proxy-mode program's request counters.
    pub fn requests(&self, program: &str) -> zdt::state::RequestCounts {
        self.status()
            .into_iter()
            .find(|p| p.name == program)
            .and_then(|p| p.requests)
            .unwrap_or_else(|| panic!("no request counters for {program} in status"))
    }

    /// Waits until `program` has `n` requests in flight.
    pub fn wait_inflight(&self, program: &str, n: u64, timeout: Duration) {
        wait_for(
            &format!("{program} to have {n} requests in flight"),
            timeout,
            || {
                let r = self.requests(program);
                if r.inflight == n {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        );
    }

    /// Waits until `program:instance` is in `state`; returns its snapshot.
    pub fn wait_state(
        &self,
        program: &str,
        instance: u32,
        state: InstanceState,
        timeout: Duration,
    ) -> InstanceSnapshot {
        wait_for(
            &format!("{program}:{instance} to be {state}"),
            timeout,
            || {
                let i = self.instance(program, instance);
                if i.state == state {
                    Ok(i)
                } else {
                    Err(format!("{i:?}"))
                }
            },
        )
    }

    /// A file under the test directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Sends a signal to zdt.
    pub fn signal(&self, sig: i32) {
        kill(self.pid(), sig);
    }

    /// Pretends zdt was never started by us: it will not be killed on drop.
    pub fn forget(&mut self) {
        self.child = None;
    }
}

fn dump_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            dump_dir(&p);
        } else if p.extension().is_some_and(|x| x == "log") {
            eprintln!(
                "--- {}:\n{}",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
    }
}

impl Daemon {
    /// Pids of the live workers, from status; empty if zdt does not answer
    /// within a few seconds (a frozen zdt must not hang the cleanup).
    fn worker_pids(&self) -> Vec<u32> {
        let Ok(mut ctl) = Command::new(bin("zdtctl"))
            .arg("-c")
            .arg(&self.config)
            .args(["--json", "status"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            return Vec::new();
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(None) = ctl.try_wait() {
            if Instant::now() > deadline {
                let _ = ctl.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Ok(out) = ctl.wait_with_output() else {
            return Vec::new();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap_or(""))
        else {
            return Vec::new();
        };
        let programs: Vec<ProgramSnapshot> =
            serde_json::from_value(v["programs"].clone()).unwrap_or_default();
        programs
            .iter()
            .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- zdt stderr:\n{}", self.stderr());
            dump_dir(self.dir.path());
        }
        if let Some(mut child) = self.child.take() {
            // The workers' process groups, to end their own children too.
            // Not under a wrapper such as `unshare --pid`: status names the
            // pids of zdt's own PID namespace, which are other processes
            // here; that namespace ends with zdt (`--kill-child`).
            let leaders = if self.manager.wrap.is_empty() {
                self.worker_pids()
            } else {
                Vec::new()
            };
            // SIGKILL: PR_SET_PDEATHSIG takes the workers with it, but not
            // what they forked (php -S workers, for one).
            let _ = child.kill();
            let _ = child.wait();
            for pid in leaders {
                // SAFETY: kill(2) with a negative pid signals that process group.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
        }
    }
}
