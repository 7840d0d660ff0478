//! zdtctl as a command-line tool: a stdout closed early, a socket it may not
//! use.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(15);

/// A stdout whose reader is already gone: every write fails with EPIPE.
fn closed_stdout() -> Stdio {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    Stdio::from(write)
}

/// Runs zdtctl; fails the test if it does not end within `T`.
fn run_within(cmd: &mut Command) -> Output {
    cmd.stderr(Stdio::piped());
    output_within(cmd, T).unwrap_or_else(|| panic!("{cmd:?} did not end within {T:?}"))
}

#[test]
fn a_closed_stdout_ends_zdtctl_quietly() {
    let port = free_port();
    let d = Daemon::start(
        &(header() + &demo_program("web", &["--port", &port.to_string()], "startsecs = \"0s\"")),
    );
    d.wait_state("web", 0, Running, T);
    wait_for("output to tail", T, || {
        let out = d.ctl(&["tail", "web"]);
        if out.stdout.is_empty() {
            Err("nothing yet".into())
        } else {
            Ok(())
        }
    });
    for args in [
        &["status"][..],
        &["--json", "status"],
        &["pid", "web"],
        &["tail", "web"],
        &["tail", "-f", "web"],
    ] {
        let out = run_within(
            Command::new(bin("zdtctl"))
                .arg("-c")
                .arg(&d.config)
                .args(args)
                .stdout(closed_stdout()),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "zdtctl {args:?}: {err}");
        assert!(err.is_empty(), "zdtctl {args:?} printed: {err}");
        assert_eq!(out.status.code(), Some(0), "zdtctl {args:?}: {err}");
    }
}

#[test]
fn a_socket_zdtctl_may_not_use_says_permission_denied() {
    let d = Daemon::start(&(header() + "[program.web]\ncommand = [\"sleep\", \"1000\"]\n"));
    // The folders may be searched by anyone; the socket itself is 0600.
    for dir in [d.path(""), d.path("run")] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let sock = d.path("run/zdt.sock");
    let out = run_within(
        Command::new(bin("zdtctl"))
            .arg("-s")
            .arg(&sock)
            .arg("status")
            .stdout(Stdio::piped())
            .uid(65534)
            .gid(65534),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(
        err.contains("sudo") && err.contains("control_group"),
        "{err}"
    );
    assert!(!err.contains("is zdt running"), "{err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    // A socket that does not exist still says so.
    let missing = d.path("run/none.sock");
    let out = run_within(
        Command::new(bin("zdtctl"))
            .arg("-s")
            .arg(&missing)
            .arg("status")
            .stdout(Stdio::piped()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is zdt running"), "{err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
}

#[test]
fn completions_and_the_man_page_need_no_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = |args: &[&str]| {
        let out = run_within(
            Command::new(bin("zdtctl"))
                .args(args)
                .current_dir(dir.path())
                .env_remove("ZDT_CONFIG")
                .stdout(Stdio::piped()),
        );
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // bash loads the script and registers it for zdtctl.
    let script = dir.path().join("zdtctl.bash");
    std::fs::write(&script, ctl(&["completions", "bash"])).expect("write");
    let out = run_within(
        Command::new("bash")
            .arg("-c")
            .arg(format!("source {} && complete -p zdtctl", script.display()))
            .stdout(Stdio::piped()),
    );
    let registered = String::from_utf8_lossy(&out.stdout);
    assert!(
        registered.contains("_zdtctl") && registered.contains("zdtctl"),
        "{out:?}"
    );
    let script = std::fs::read_to_string(&script).expect("read");
    assert!(
        script.contains("restart") && script.contains("undrain"),
        "{script}"
    );
    for shell in ["zsh", "fish"] {
        let text = ctl(&["completions", shell]);
        assert!(
            text.contains("restart") && text.contains("deploy"),
            "{shell}: {text}"
        );
    }
    let man = ctl(&["man"]);
    assert!(man.contains(".TH zdtctl 1"), "{man}");
    assert!(
        man.contains("restart") && man.contains("drain_delay"),
        "{man}"
    );
}
