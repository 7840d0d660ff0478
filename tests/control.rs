//! The control socket under bad input: garbage, oversized lines, silent
//! clients. The daemon answers, keeps serving others, and never dies.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::util::*;

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(d.path("run/zdt.sock")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s
}

fn read_line(s: &UnixStream) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

#[test]
fn garbage_oversized_and_silent_clients_do_not_stop_the_daemon() {
    let d =
        Daemon::start(&(header() + &demo_program("w", &["--port", &free_port().to_string()], "")));
    // A client that connects and says nothing.
    let _silent = connect(&d);
    // Garbage gets an error reply and the connection stays usable.
    let mut g = connect(&d);
    g.write_all(b"this is not json\n").expect("write");
    let r = read_line(&g);
    assert_eq!(r["type"], "error");
    assert_eq!(r["error"]["kind"], "bad_request");
    g.write_all(b"{\"version\":1,\"cmd\":\"frobnicate\"}\n")
        .expect("write");
    assert_eq!(read_line(&g)["error"]["kind"], "bad_request");
    g.write_all(b"{\"version\":99,\"cmd\":\"version\"}\n")
        .expect("write");
    assert_eq!(read_line(&g)["error"]["kind"], "version");
    g.write_all(b"{\"version\":1,\"cmd\":\"version\"}\n")
        .expect("write");
    assert_eq!(read_line(&g)["type"], "ok");

    // 1 MiB without a newline: too_large, then the daemon closes the connection.
    let mut big = connect(&d);
    let chunk = vec![b'x'; 1024 * 1024];
    let _ = big.write_all(&chunk);
    let r = read_line(&big);
    assert_eq!(r["error"]["kind"], "too_large", "{r}");
    let mut rest = Vec::new();
    let _ = big.read_to_end(&mut rest);

    // Meanwhile zdtctl from another client still works.
    let out = d.ctl(&["status"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("w "),
        "{out:?}"
    );
}

#[test]
fn control_socket_is_private_and_a_second_zdt_refuses_to_start() {
    let d = Daemon::start(&header());
    let mode = std::fs::metadata(d.path("run/zdt.sock"))
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = std::process::Command::new(bin("zdt"))
        .arg("-c")
        .arg(&d.config)
        .output()
        .expect("second zdt");
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first one is unaffected.
    assert!(d.ctl(&["version"]).status.success());
}

#[test]
fn a_stale_socket_from_a_killed_zdt_is_replaced() {
    let mut d = Daemon::start(&header());
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    assert!(
        d.path("run/zdt.sock").exists(),
        "a SIGKILLed zdt leaves its socket"
    );
    let d2 = Daemon::start(&std::fs::read_to_string(&d.config).expect("config"));
    assert!(d2.ctl(&["version"]).status.success());
}
