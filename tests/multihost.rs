//! bench/multihost.sh, short form: three hosts (network namespaces as root,
//! else loopback addresses), each running zdt with a Node app, behind
//! HAProxy with its own retry defaults (retries 3, retry-on conn-failure, no
//! redispatch: a 503 reaches the client) and an active check of zdt's
//! /health. contrib/ansible/rolling-restart.yml on hosts with
//! drain_delay = check interval x fall + margin restarts them one at a time
//! under 32 clients and fails no request: HAProxy has taken each host out
//! before it refuses anything. The same rolling restart without the drain
//! step (stop zdt, start it, on hosts without drain_delay: `systemctl
//! restart`) fails some every time: the requests that reach a stopping host
//! get its 503, which this HAProxy passes on. Skipped, with the reason, when
//! a tool it needs is missing (haproxy, node, curl, python3, or ansible-core,
//! which the script installs into a venv with pip when it is not in PATH).

use std::process::Command;

use crate::util::*;

/// The value of `key=` in a RESULT line.
fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn number(line: &str, key: &str) -> u64 {
    let v = value(line, key);
    v.parse().unwrap_or_else(|_| panic!("{key}={v} in {line}"))
}

#[test]
fn rolling_restart_behind_plain_haproxy_fails_nothing_with_the_drain_step_and_some_without() {
    if Command::new("bash").arg("-c").arg("true").status().is_err() {
        eprintln!("SKIPPED: no bash");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/multihost.sh");
    let zdt = bin("zdt");
    let bin_dir = zdt.parent().expect("the binaries' folder");
    let out = Command::new("bash")
        .arg(script)
        .arg("--quick")
        .env("ZDT_BIN_DIR", bin_dir)
        .output()
        .expect("run bench/multihost.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        let why = stderr.lines().rfind(|l| l.contains("SKIP")).unwrap_or("");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let context = format!("exit {:?}\n{stdout}\n{stderr}", out.status.code());
    let result = |recipe: &str| -> String {
        stdout
            .lines()
            .find(|l| l.starts_with("RESULT ") && l.contains(&format!(" recipe={recipe} ")))
            .unwrap_or_else(|| panic!("no RESULT line for {recipe}: {context}"))
            .to_string()
    };
    for line in stdout.lines().filter(|l| l.starts_with("RESULT ")) {
        eprintln!("{line}");
    }
    let drain = result("drain");
    let naive = result("no-drain");
    for r in [&drain, &naive] {
        assert_eq!(value(r, "balancer"), "haproxy-plain", "{context}");
        assert_eq!(number(r, "playbook_rc"), 0, "{context}");
    }
    // The drain recipe ran with drain_delay (3 s = inter 1 s x fall 2 + 1 s).
    assert_eq!(number(&drain, "drain_delay_s"), 3, "{context}");
    assert_eq!(number(&naive, "drain_delay_s"), 0, "{context}");
    // The drain recipe: not one request failed, clients included, with no
    // retry of 503s in the balancer.
    assert_eq!(number(&drain, "failed"), 0, "{context}");
    assert!(number(&drain, "requests") > 1000, "{context}");
    // Every host was restarted while it served: three first-generation and
    // three second-generation Node processes answered.
    assert!(number(&drain, "npids") >= 6, "{context}");
    // Without the drain step the balancer finds out by failing: the requests
    // that reach a stopping host get its 503.
    assert!(number(&naive, "failed") > 0, "{context}");
    assert_eq!(out.status.code(), Some(0), "{context}");
}
