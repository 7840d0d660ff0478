//! zdt as PID 1 of a PID namespace, the way a container runs it
//! (contrib/kubernetes): it reaps the orphans its workers leave, and SIGTERM
//! (what the kubelet sends) lets every request in flight finish, then zdt
//! exits 0 and nothing of the namespace is left.
//!
//! The namespace comes from `unshare --pid --fork --kill-child`: the test's
//! [`Daemon`] is `unshare`, and zdt is its only child. Pids in `zdtctl
//! status` are the namespace's; this file maps them to the host's through
//! the `NSpid` line of `/proc/PID/status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zdt::state::InstanceState::*;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(10);

/// The last argument of the orphan each worker leaves behind.
const ORPHAN: &str = "zdt-pid1-orphan";

/// What `/proc/PID` says about one process, as the host sees it.
#[derive(Debug, Clone, PartialEq)]
struct Proc {
    pid: u32,
    ppid: u32,
    /// R, S, D, Z, ...
    state: char,
    /// Clock ticks after boot (field 22 of stat): tells a reused pid apart.
    start: u64,
    /// Its pid in each namespace, outermost first (`NSpid`).
    nspid: Vec<u32>,
    argv: Vec<String>,
}

fn read_proc(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let argv = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(Proc {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
        nspid,
        argv,
    })
}

/// The PID namespace of a process (`pid:[INODE]`).
fn pid_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Every process of the PID namespace `ns`.
fn in_namespace(ns: &Path) -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid_ns(pid).as_deref() == Some(ns))
        .filter_map(read_proc)
        .collect()
}

/// The processes of `procs` in state Z, for a failure message.
fn zombies(procs: &[Proc]) -> Vec<&Proc> {
    procs.iter().filter(|p| p.state == 'Z').collect()
}

/// The `unshare` command that makes zdt PID 1 of a new PID namespace, with
/// a /proc of that namespace if mounting one works; Err with the reason if
/// `unshare --pid` itself fails here.
fn pid_namespace() -> Result<Vec<String>, String> {
    let base = ["unshare", "--pid", "--fork", "--kill-child"];
    let mut why = String::new();
    for extra in [&["--mount-proc"][..], &[]] {
        let argv: Vec<String> = base.iter().chain(extra).map(|a| a.to_string()).collect();
        let out = output_within(
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .arg("true")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped()),
            Duration::from_secs(5),
        );
        match out {
            Some(o) if o.status.success() => return Ok(argv),
            Some(o) => {
                why = format!(
                    "{} true: {}",
                    argv.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
            None => why = format!("{} true did not end within 5 s", argv.join(" ")),
        }
    }
    Err(why)
}

/// Each worker is `sh -c` that starts an orphan, then execs the Node app
/// (contrib/node/server.js) in proxy mode. The orphan is double-forked (the
/// `sh -c '… &'` in between exits at once), so it is no child of the worker:
/// the kernel hands it to the namespace's init, zdt. It runs until the file
/// `orphan.exit` appears in the worker's directory, then exits 0.
///
/// A worker still running 300 ms after its SIGTERM is SIGKILLed: only zdt's
/// drain by its in-flight count, not the app's own, lets the slow requests
/// finish.
fn config(port: u16) -> String {
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/node/server.js");
    let script = format!(
        "sh -c \"sh -c 'while [ ! -e orphan.exit ]; do sleep 0.05; done' {ORPHAN} &\"; exec node \"$1\""
    );
    header()
        + &format!(
            "[program.web]\n\
             command = [\"sh\", \"-c\", {script:?}, \"sh\", {server:?}]\n\
             directory = \".\"\n\
             mode = \"proxy\"\n\
             listen = [\"tcp://127.0.0.1:{port}\"]\n\
             ready = {{ http = \"/\" }}\n\
             instances = 2\n\
             max_wait = \"10s\"\n\
             kill_timeout = \"300ms\"\n\
             environment = {{ DRAIN_GRACE_MS = \"100\", ZDT_BIN = {zdt:?} }}\n",
            server = server.display().to_string(),
            zdt = bin("zdt").display().to_string(),
        )
}

#[test]
fn pid1_in_a_pid_namespace_reaps_orphans_and_drains_on_sigterm() {
    let wrap = match pid_namespace() {
        Ok(w) => w,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a PID namespace here ({why})");
            return;
        }
    };
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is needed for this test (.ci/run installs it)"
    );
    let port = free_port();
    let mut d = Daemon::start_with(
        &config(port),
        Manager {
            wrap,
            ..Manager::default()
        },
    );

    // zdt is the only child of unshare, and PID 1 of a namespace of its own.
    let unshare = d.pid();
    let zdt = wait_for("zdt under unshare", T, || {
        let kids: Vec<Proc> = std::fs::read_dir("/proc")
            .map_err(|e| e.to_string())?
            .flatten()
            .filter_map(|e| read_proc(e.file_name().to_str()?.parse().ok()?))
            .filter(|p| p.ppid == unshare)
            .collect();
        match kids.as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(zdt.nspid.first(), Some(&zdt.pid), "{zdt:?}");
    assert_eq!(zdt.nspid.last(), Some(&1), "zdt is not PID 1: {zdt:?}");
    assert!(zdt.nspid.len() >= 2, "no PID namespace: {zdt:?}");
    let ns = pid_ns(zdt.pid).expect("zdt's PID namespace");
    assert_ne!(Some(&ns), pid_ns(std::process::id()).as_ref());

    d.wait_state("web", 0, Running, T);
    d.wait_state("web", 1, Running, T);
    // The workers, by their pids in the namespace (status) and on the host.
    let workers: Vec<Proc> = d
        .status()
        .iter()
        .flat_map(|p| p.instances.iter().filter_map(|i| i.pid))
        .map(|inner| {
            in_namespace(&ns)
                .into_iter()
                .find(|p| p.nspid.last() == Some(&inner))
                .unwrap_or_else(|| panic!("no process {inner} in zdt's namespace"))
        })
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    for w in &workers {
        assert!(w.argv.first().is_some_and(|a| a == "node"), "{w:?}");
    }

    // Orphans: adopted by zdt, and reaped by it once they exit.
    let orphans = wait_for("each worker's orphan to be adopted by zdt", T, || {
        let procs = in_namespace(&ns);
        let adopted: Vec<Proc> = procs
            .iter()
            .filter(|p| p.argv.last().is_some_and(|a| a == ORPHAN) && p.ppid == zdt.pid)
            .cloned()
            .collect();
        if adopted.len() == 2 {
            Ok(adopted)
        } else {
            Err(format!("{procs:?}"))
        }
    });
    std::fs::write(d.path("orphan.exit"), "").expect("write orphan.exit");
    wait_for(
        "the orphans to exit and be reaped, no zombie left",
        T,
        || {
            let procs = in_namespace(&ns);
            let left: Vec<&Proc> = procs
                .iter()
                .filter(|p| orphans.iter().any(|o| o.pid == p.pid && o.start == p.start))
                .collect();
            if left.is_empty() && zombies(&procs).is_empty() {
                Ok(())
            } else {
                Err(format!("orphans left {left:?}; namespace {procs:?}"))
            }
        },
    );
    assert!(d.stderr().contains("reaped orphan"), "{}", d.stderr());

    // Load: fast requests, and slow ones (1 to 1.4 s) that are in flight
    // when the SIGTERM comes.
    let fast = Load::start(port, 8, 4, &[0, 5, 20]);
    let slow = Load::start(port, 6, 2, &[1000, 1200, 1400]);
    fast.wait_progress("requests through zdt");
    // The clients then stop beginning requests, and the SIGTERM waits until
    // zdt counts in flight every request they still have: a request written
    // but not yet read by zdt when the SIGTERM comes is a new one to zdt,
    // answered 503 (the outer balancer's part, and drain_delay's), so that
    // would be a different test. The sum is read first: no request begins
    // any more, so zdt counting as many after it means it counts them all.
    fast.hold();
    slow.hold();
    let inflight = wait_for("zdt to count every request sent in flight", T, || {
        let sent = fast.outstanding() + slow.outstanding();
        let counted = d.requests("web").inflight;
        // A slow one among them: the SIGTERM must find one in flight.
        if sent == counted && slow.outstanding() > 0 {
            Ok(counted)
        } else {
            Err(format!(
                "sent and unanswered {sent}, in flight in zdt {counted}"
            ))
        }
    });
    let answered_before = slow.ok_so_far();
    let t0 = Instant::now();
    kill(zdt.pid, libc::SIGTERM);
    let exit = d.wait_exit(T);
    let took = t0.elapsed();
    assert_eq!(exit.code(), Some(0), "zdt exited {exit:?}:\n{}", d.stderr());
    let (fast, slow) = (fast.stop(), slow.stop());
    assert_eq!(fast.failed, 0, "fast requests failed: {:?}", fast.errors);
    assert_eq!(slow.failed, 0, "slow requests failed: {:?}", slow.errors);
    assert!(
        slow.ok > answered_before,
        "no slow request was answered after the SIGTERM ({inflight} were in flight)"
    );
    eprintln!(
        "{inflight} requests in flight at the SIGTERM, {} slow ones answered after it; zdt exited 0 after {took:?}",
        slow.ok - answered_before
    );

    // Nothing of the namespace is left: not the workers, not a zombie.
    let left = in_namespace(&ns);
    assert!(left.is_empty(), "left in zdt's namespace: {left:?}");
    for w in &workers {
        let now = read_proc(w.pid);
        assert!(
            now.as_ref().is_none_or(|p| p.start != w.start),
            "worker {w:?} is still there: {now:?}"
        );
    }
}
