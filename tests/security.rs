//! Local security: no path another user prepared is trusted (zdt::rundir),
//! and notify messages count only from the worker's own process group.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use zdt::state::InstanceState::Running;

use crate::util::*;

const T: Duration = Duration::from_secs(20);

/// `nobody`: the other local user of these tests (they run as root).
const NOBODY: u32 = 65534;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A folder that looks like /tmp: root's, mode 1777.
fn fake_tmp() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    chmod(t.path(), 0o1777);
    t
}

/// `zdt run` serving a demo worker on `port`, with `env` for zdt.
fn zdt_run(port: u16, env: &[(&str, &Path)]) -> Command {
    let mut cmd = Command::new(bin("zdt"));
    cmd.args(["run", "--listen", &format!("tcp://127.0.0.1:{port}"), "--"])
        .arg(bin("zdt-demo"))
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("TMPDIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Kills the zdt it holds when dropped (a failing test leaves nothing).
struct Guard(Option<Child>);

impl Guard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("zdt is held")
    }

    fn take(&mut self) -> Child {
        self.0.take().expect("zdt is held")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (bounded) for `child` to exit; kills it if it does not.
fn exit_of(mut child: Child) -> Output {
    let exited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("zdt to exit", T, || {
            child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_string())
        })
    }));
    if exited.is_err() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("zdt output")
}

/// Runs `zdt run` where its runtime folder is `dir` (prepared by the test)
/// and expects a refusal that names `dir` and says `problem`.
fn expect_refused(port: u16, env: &[(&str, &Path)], dir: &Path, problem: &str) {
    let out = exit_of(zdt_run(port, env).spawn().expect("spawn zdt"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("refusing to use {}", dir.display())),
        "{err}"
    );
    assert!(err.contains(problem), "{err}");
    // Nothing was written into it, and nothing started.
    let planted: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(planted.is_empty(), "zdt wrote into {dir:?}: {planted:?}");
    assert!(
        http_get(port, "/").is_err(),
        "a worker was started under a refused runtime folder"
    );
}

#[test]
fn zdt_run_refuses_a_runtime_folder_another_user_prepared() {
    let port = free_port();
    let uid = nix::unistd::geteuid().as_raw();

    // Mode 0777: anyone could plant a config in it.
    let tmp = fake_tmp();
    let dir = tmp.path().join(format!("zdt-{uid}"));
    std::fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o777);
    expect_refused(port, &[("TMPDIR", tmp.path())], &dir, "mode is 0777");

    // Mode 0700 but someone else's.
    let tmp = fake_tmp();
    let dir = tmp.path().join(format!("zdt-{uid}"));
    std::fs::create_dir(&dir).expect("mkdir");
    chmod(&dir, 0o700);
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    expect_refused(
        port,
        &[("TMPDIR", tmp.path())],
        &dir,
        &format!("owned by uid {NOBODY}"),
    );

    // A symlink to a folder of the attacker's.
    let tmp = fake_tmp();
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    chmod(&theirs, 0o700);
    let dir = tmp.path().join(format!("zdt-{uid}"));
    std::os::unix::fs::symlink(&theirs, &dir).expect("symlink");
    expect_refused(port, &[("TMPDIR", tmp.path())], &dir, "symbolic link");
    assert_eq!(std::fs::read_dir(&theirs).expect("ls").count(), 0);

    // The same under XDG_RUNTIME_DIR.
    let xdg = tempfile::tempdir().expect("tempdir");
    let dir = xdg.path().join("zdt");
    std::os::unix::fs::symlink(&theirs, &dir).expect("symlink");
    expect_refused(
        port,
        &[("XDG_RUNTIME_DIR", xdg.path())],
        &dir,
        "symbolic link",
    );
}

#[test]
fn zdt_run_makes_a_private_runtime_folder_and_serves() {
    let port = free_port();
    let tmp = fake_tmp();
    let uid = nix::unistd::geteuid().as_raw();
    let mut zdt = Guard(Some(
        zdt_run(port, &[("TMPDIR", tmp.path())])
            .spawn()
            .expect("spawn zdt"),
    ));
    let pid = zdt.child().id();
    let dir = tmp.path().join(format!("zdt-{uid}"));
    let sock = dir.join(format!("run-{pid}.sock"));
    let status = wait_for("zdt run's control socket", T, || {
        if let Ok(Some(st)) = zdt.child().try_wait() {
            panic!("zdt run exited with {st}");
        }
        let out = Command::new(bin("zdtctl"))
            .arg("-s")
            .arg(&sock)
            .arg("status")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    assert!(status.contains("app"), "{status}");
    let meta = std::fs::symlink_metadata(&dir).expect("runtime folder");
    assert!(meta.is_dir());
    assert_eq!(meta.mode() & 0o7777, 0o700);
    assert_eq!(meta.uid(), uid);
    let config = std::fs::metadata(dir.join(format!("run-{pid}.toml"))).expect("config");
    assert_eq!(config.mode() & 0o777, 0o600);
    let (code, _) = wait_for("the worker to answer", T, || http_get(port, "/"));
    assert_eq!(code, 200);
    kill(pid, libc::SIGTERM);
    let out = exit_of(zdt.take());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A second run reuses the folder it made.
    let port = free_port();
    let mut again = Guard(Some(
        zdt_run(port, &[("TMPDIR", tmp.path())])
            .spawn()
            .expect("spawn zdt"),
    ));
    wait_for("the second run to serve", T, || {
        if let Ok(Some(st)) = again.child().try_wait() {
            panic!("zdt run exited with {st}");
        }
        http_get(port, "/")
    });
    kill(again.child().id(), libc::SIGTERM);
    assert!(exit_of(again.take()).status.success());
}

/// Starts zdt on `config` (in `dir`) and expects it to refuse to start.
fn expect_start_refused(dir: &Path, config: &str) -> String {
    let path = dir.join("supervisor.toml");
    std::fs::write(&path, config).expect("config");
    let child = Command::new(bin("zdt"))
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zdt");
    let out = exit_of(child);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[test]
fn control_socket_and_log_dir_in_a_folder_others_can_write_are_refused() {
    let t = tempfile::tempdir().expect("tempdir");
    let open = t.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    chmod(&open, 0o777);
    let err = expect_start_refused(
        t.path(),
        &format!("[supervisor]\ncontrol = \"{}/zdt.sock\"\n", open.display()),
    );
    assert!(
        err.contains(&format!(
            "{} is writable by everyone (mode 0777) and not sticky",
            open.display()
        )),
        "{err}"
    );
    assert!(!open.join("zdt.sock").exists());

    let err = expect_start_refused(
        t.path(),
        &format!(
            "[supervisor]\ncontrol = \"run/zdt.sock\"\nlog_dir = \"{}/logs\"\n",
            open.display()
        ),
    );
    assert!(err.contains("log_dir: refusing to use"), "{err}");

    // Sticky and root's, like /tmp: fine.
    chmod(&open, 0o1777);
    let d = Daemon::start(&format!(
        "[supervisor]\ncontrol = \"{}/zdt.sock\"\nlog_dir = \"{}/logs\"\n",
        open.display(),
        open.display()
    ));
    assert!(d.ctl(&["status"]).status.success());
}

#[test]
fn a_symlink_planted_at_the_pidfile_is_not_followed() {
    let t = tempfile::tempdir().expect("tempdir");
    let victim = t.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("victim");
    let pidfile = t.path().join("zdt.pid");
    std::os::unix::fs::symlink(&victim, &pidfile).expect("symlink");
    let d = Daemon::start(&header().replace(
        "log_dir",
        &format!("pidfile = \"{}\"\nlog_dir", pidfile.display()),
    ));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious\n"
    );
    let meta = std::fs::symlink_metadata(&pidfile).expect("pidfile");
    assert!(meta.is_file(), "{meta:?}");
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pidfile"),
        format!("{}\n", d.pid())
    );
}

/// The `NOTIFY_SOCKET` zdt gave process `pid` (once it has exec'ed).
fn notify_socket_of(pid: u32) -> String {
    wait_for("the worker's NOTIFY_SOCKET", T, || {
        let raw = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&raw)
            .split('\0')
            .find_map(|v| v.strip_prefix("NOTIFY_SOCKET=").map(String::from))
            .ok_or_else(|| "not set yet".to_string())
    })
}

#[test]
fn notify_messages_from_outside_the_workers_group_are_ignored() {
    use std::os::unix::process::CommandExt;
    let port = free_port();
    let d = Daemon::start(&header());
    let flag = d.path("bad-release");
    let flag_s = flag.display().to_string();
    d.write_config(
        &(header()
            + &demo_program(
                "web",
                &["--unready-if", &flag_s],
                &format!(
                    "listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\n\
                     ready_timeout = \"3s\""
                ),
            )),
    );
    assert!(d.ctl(&["reload"]).status.success());
    // A real worker still becomes ready through its notify socket.
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    wait_for("the service to answer", T, || http_get(port, "/"));

    // A release that never becomes ready; restart it.
    std::fs::write(&flag, "").expect("flag");
    let restart = d.ctl_in_background(&["restart", "web"]);
    let candidate = wait_for("the new generation to be spawned", T, || {
        let snap = d.status();
        snap[0]
            .instances
            .iter()
            .filter_map(|i| i.pid)
            .find(|&p| p != old)
            .ok_or_else(|| format!("{snap:?}"))
    });
    // Another local user finds its socket and claims it is ready.
    let socket = notify_socket_of(candidate);
    let forged = Command::new(bin("zdt"))
        .args(["notify", "READY=1", "STATUS=\x1b[31mevil"])
        .env("NOTIFY_SOCKET", &socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run zdt notify as nobody");
    // Sent (abstract sockets have no permissions); zdt had handled it when
    // the barrier returned.
    assert!(forged.status.success(), "{forged:?}");

    let out = restart.join().expect("restart");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the forged READY=1 was accepted: {err}"
    );
    assert!(err.contains("not ready within ready_timeout"), "{err}");
    let st = d.instance("web", 0);
    assert_eq!((st.state, st.pid), (Running, Some(old)));
    let (code, _) = http_get(port, "/").expect("the old generation serves");
    assert_eq!(code, 200);
    for p in d.status() {
        for i in p.instances {
            let text = i.status_text.unwrap_or_default();
            assert!(!text.contains('\x1b') && !text.contains("evil"), "{text:?}");
        }
    }
    let log = d.stderr();
    let warning = log
        .lines()
        .find(|l| l.contains("ignoring a notify message from a process outside"))
        .unwrap_or_else(|| panic!("no warning about the forged message: {log}"));
    assert!(warning.contains(&NOBODY.to_string()), "{warning}");
}

#[test]
fn a_workers_status_text_has_its_control_characters_escaped() {
    // `zdt notify` run from a shell exits (and is reaped) right after
    // sending: its message must count all the same.
    let script = "\"$ZDT\" notify \"STATUS=$ST\" READY=1 && exec sleep 600";
    let d = Daemon::start(&format!(
        "{}[program.sh]\ncommand = [\"sh\", \"-c\", {script:?}]\nready = {{ notify = true }}\n\
         environment = {{ ZDT = {:?}, ST = \"\\u001b[31mred\\u0007\" }}\n",
        header(),
        bin("zdt").display().to_string()
    ));
    let i = d.wait_state("sh", 0, Running, T);
    assert_eq!(i.status_text.as_deref(), Some("\\u{1b}[31mred\\u{7}"));
    let out = d.ctl(&["status"]);
    assert!(!out.stdout.contains(&0x1b), "{out:?}");
}

/// `stdout_logfile` outside `log_dir` is opened as root by path, following
/// symlinks: the folder here belongs to another user (nobody), who planted
/// `out.log -> victim`; the worker's output lands in the victim file.
#[test]
fn a_log_file_symlink_planted_by_another_user_is_not_written_through() {
    use std::os::unix::fs::PermissionsExt;
    let probe = tempfile::tempdir().expect("tempdir");
    let open = probe.path().join("applogs");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(probe.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Owned by nobody: that user may create and replace entries in it.
    nix::unistd::chown(&open, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let victim = probe.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("write");
    std::os::unix::fs::symlink(&victim, open.join("out.log")).expect("symlink");
    let d = Daemon::start(
        &(header()
            + &format!(
                "[program.w]\ncommand = [\"sh\", \"-c\", \"echo INJECTED; exec sleep 1000\"]\nstartsecs = \"0s\"\nstdout_logfile = \"{}\"\n",
                open.join("out.log").display()
            )),
    );
    d.wait_state("w", 0, Running, T);
    wait_for("the worker's output in zdt's ring", T, || {
        let out = d.ctl(&["tail", "w"]);
        if String::from_utf8_lossy(&out.stdout).contains("INJECTED") {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n",
        "zdt (root) wrote a worker's output through a symlink another user planted"
    );
}
