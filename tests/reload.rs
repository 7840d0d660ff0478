//! Reload (SIGHUP and `zdtctl reload`): apply the difference, or reject the
//! whole file and change nothing.

use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::load::Load;
use crate::util::*;

const T: Duration = Duration::from_secs(15);

fn prog(name: &str, port: u16, extra: &str) -> String {
    demo_program(
        name,
        &["--port", &port.to_string()],
        &format!("startsecs = \"0s\"\n{extra}"),
    )
}

#[test]
fn reload_adds_removes_and_changes_programs() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let keep = prog("keep", pa, "");
    let d = Daemon::start(&(header() + &keep + &prog("gone", pb, "") + &prog("changed", pc, "")));
    let keep_pid = d.wait_state("keep", 0, Running, T).pid;
    let gone_pid = d.wait_state("gone", 0, Running, T).pid.expect("pid");
    let changed_pid = d.wait_state("changed", 0, Running, T).pid;

    let pn = free_port();
    d.write_config(
        &(header()
            + &keep
            + &prog("changed", pc, "environment = { FLAVOUR = \"new\" }")
            + &prog("new", pn, "")),
    );
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("added new"), "{text}");
    assert!(text.contains("removed gone"), "{text}");
    assert!(text.contains("changed changed"), "{text}");
    assert!(text.contains("unchanged keep"), "{text}");

    let names: Vec<String> = d.status().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["changed", "keep", "new"]);
    assert_eq!(
        d.instance("keep", 0).pid,
        keep_pid,
        "unchanged program was touched"
    );
    let c = d.wait_state("changed", 0, Running, T);
    assert_ne!(c.pid, changed_pid, "changed program was not restarted");
    d.wait_state("new", 0, Running, T);
    wait_for("the removed program's worker to exit", T, || {
        if alive(gone_pid) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });
}

#[test]
fn invalid_reload_is_rejected_whole_and_nothing_changes() {
    let (pa, pb) = (free_port(), free_port());
    let good = header() + &prog("a", pa, "") + &prog("b", pb, "");
    let d = Daemon::start(&good);
    let before: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| d.wait_state(n, 0, Running, T).pid)
        .collect();
    // One valid change (a removed) and one error: nothing may be applied.
    d.write_config(&(header() + &prog("b", pb, "stop_signal = \"NOPE\"")));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("supervisor.toml:") && err.contains("NOPE"),
        "{err}"
    );
    let after: Vec<_> = ["a", "b"].iter().map(|n| d.instance(n, 0).pid).collect();
    assert_eq!(before, after);
    // SIGHUP with the bad file: also rejected, zdt keeps running.
    d.signal(libc::SIGHUP);
    wait_for("the rejection in zdt's log", T, || {
        if d.stderr().contains("reload rejected") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let after: Vec<_> = ["a", "b"].iter().map(|n| d.instance(n, 0).pid).collect();
    assert_eq!(before, after);
}

#[test]
fn sighup_applies_a_valid_change() {
    let pa = free_port();
    let d = Daemon::start(&(header() + &prog("a", pa, "")));
    d.wait_state("a", 0, Running, T);
    let pb = free_port();
    d.write_config(&(header() + &prog("a", pa, "") + &prog("b", pb, "")));
    d.signal(libc::SIGHUP);
    wait_for("b to appear", T, || {
        if d.status().iter().any(|p| p.name == "b") {
            Ok(())
        } else {
            Err("absent".into())
        }
    });
    d.wait_state("b", 0, Running, T);
}

/// A pass-mode demo program on `port` (zdt owns the socket).
fn owned(name: &str, port: u16, args: &[&str], extra: &str) -> String {
    demo_program(
        name,
        args,
        &format!("listen = [\"tcp://127.0.0.1:{port}\"]\nready = {{ notify = true }}\nstartsecs = \"0s\"\n{extra}"),
    )
}

#[test]
fn a_reload_moving_listen_to_an_address_in_use_is_rejected_and_changes_nothing() {
    let (p1, p2) = (free_port(), free_port());
    let d = Daemon::start(&(header() + &owned("web", p1, &[], "")));
    let pid = d.wait_state("web", 0, Running, T).pid;
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", p2)).expect("bind squatter");
    // Also a new program, which must not be added either.
    let p3 = free_port();
    d.write_config(&(header() + &owned("web", p2, &[], "") + &owned("new", p3, &[], "")));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("127.0.0.1:{p2}")) && text.contains("nothing was changed"),
        "{text}"
    );
    let names: Vec<String> = d.status().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["web"]);
    let i = d.instance("web", 0);
    assert_eq!((i.pid, i.state, i.generation), (pid, Running, 1));
    assert_eq!(http_get(p1, "/").expect("old port serves").0, 200);
    // The new program's address was not kept bound by the rejected reload.
    std::net::TcpListener::bind(("127.0.0.1", p3)).expect("p3 released");
}

#[test]
fn a_config_with_no_programs_is_rejected_unless_allowed() {
    let p = free_port();
    let d = Daemon::start(&(header() + &prog("a", p, "")));
    let pid = d.wait_state("a", 0, Running, T).pid;
    d.write_config(&header());
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no programs") && text.contains("--allow-empty"),
        "{text}"
    );
    // SIGHUP with the empty file: rejected the same way.
    d.signal(libc::SIGHUP);
    wait_for("the rejection in zdt's log", T, || {
        if d.stderr().contains("has no programs") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(d.instance("a", 0).pid, pid);
    // `zdt check` warns about it.
    let check = std::process::Command::new(bin("zdt"))
        .args(["check", "-c"])
        .arg(&d.config)
        .output()
        .expect("zdt check");
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("no programs"),
        "{check:?}"
    );
    // Asked for explicitly, it stops everything.
    let out = d.ctl(&["reload", "--allow-empty"]);
    assert!(out.status.success(), "{out:?}");
    assert!(d.status().is_empty());
    wait_for("the worker to exit", T, || match pid {
        Some(p) if alive(p) => Err("alive".into()),
        _ => Ok(()),
    });
}

#[test]
fn a_failed_reload_leaves_the_program_with_its_previous_settings() {
    let p = free_port();
    let d = Daemon::start(&(header() + &owned("web", p, &[], "")));
    let old = d.wait_state("web", 0, Running, T).pid.expect("pid");
    // The new command never gets ready: the reload's restart fails.
    d.write_config(&(header() + &owned("web", p, &["--never-ready"], "ready_timeout = \"1s\"")));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("previous settings"), "{text}");
    assert_eq!(d.instance("web", 0).pid, Some(old));
    // The old worker crashes: it comes back as it was (ready), not with the
    // rejected command (which would never be ready).
    kill(old, libc::SIGKILL);
    wait_for("a respawn with the previous settings", T, || {
        let i = d.instance("web", 0);
        match (i.pid, i.state) {
            (Some(pid), Running) if pid != old => Ok(()),
            _ => Err(format!("{i:?}")),
        }
    });
    assert_eq!(http_get(p, "/").expect("serves").0, 200);
    // The same file reloaded again tries the change again (it is still a
    // change against the settings in force), and fails again.
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn a_bind_error_is_retried_once_the_address_is_free() {
    let (p1, p2) = (free_port(), free_port());
    let squat1 = std::net::TcpListener::bind(("127.0.0.1", p1)).expect("bind");
    let squat2 = std::net::TcpListener::bind(("127.0.0.1", p2)).expect("bind");
    let d = Daemon::start(
        &(header() + &owned("auto", p1, &[], "") + &owned("manual", p2, &[], "autostart = false")),
    );
    d.wait_state("auto", 0, Fatal, T);
    // Started by hand while the address is taken: fails with the reason.
    let out = d.ctl(&["start", "manual"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on"),
        "{out:?}"
    );
    drop(squat1);
    drop(squat2);
    // autostart: bound and started by the retry, no command needed.
    d.wait_state("auto", 0, Running, T);
    assert_eq!(http_get(p1, "/").expect("serves").0, 200);
    // By hand: the next start binds again.
    let out = d.ctl(&["start", "manual"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(http_get(p2, "/").expect("serves").0, 200);
}

/// Reload 1 (a change that will fail) is still running when reload 2 (a
/// good change moving `listen`) arrives; the program queues reload 2. When
/// reload 1 fails, the supervisor's `on_settled` puts back the settings from
/// *before reload 1* although reload 2 has replaced them since: the
/// supervisor's view and the program's diverge, the registry closes the new
/// address and keeps the old one bound, and reloading the same good file
/// again is rejected with "address in use" (zdt's own socket).
#[test]
fn a_failed_reload_does_not_revert_a_later_one() {
    let (p1, p2) = (free_port(), free_port());
    let d = Daemon::start(&(header() + &owned("web", p1, &[], "")));
    d.wait_state("web", 0, Running, T);
    // Never ready, and gone by itself after 2 s (so no aborted candidate is
    // still being killed when reload 2 starts: see the next test).
    d.write_config(
        &(header()
            + &format!(
                "[program.web]\ncommand = [\"sh\", \"-c\", \"sleep 2; exit 1\"]\nlisten = [\"tcp://127.0.0.1:{p1}\"]\nready = {{ notify = true }}\nstartsecs = \"0s\"\nready_timeout = \"10s\"\n"
            )),
    );
    let r1 = d.ctl_in_background(&["reload"]);
    wait_for("reload 1 to be applied", T, || {
        if d.stderr().contains("configuration reloaded") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let good = header() + &owned("web", p2, &[], "");
    d.write_config(&good);
    let r2 = d.ctl_in_background(&["reload"]);
    let out1 = r1.join().expect("join");
    assert_eq!(out1.status.code(), Some(1), "{out1:?}");
    let out2 = r2.join().expect("join");
    assert!(out2.status.success(), "reload 2: {out2:?}");
    assert_eq!(http_get(p2, "/").expect("p2 serves").0, 200);
    // The same good file again: nothing to change.
    let out3 = d.ctl(&["reload"]);
    assert!(out3.status.success(), "reload 3: {out3:?}");
    let text = String::from_utf8_lossy(&out3.stdout);
    assert!(text.contains("unchanged web"), "{text}");
    // The address web left is released.
    std::net::TcpListener::bind(("127.0.0.1", p1)).expect("p1 released");
}

/// After a failed replace the program's generation number goes back, so the
/// next replace reuses it while the aborted candidate (same slot, same gen)
/// is still being stopped: that process's exit is taken for the new
/// candidate's, and a good change fails ("gen 2 exited before it was ready").
#[test]
fn a_replace_right_after_a_failed_one_is_not_failed_by_its_leftover() {
    let p = free_port();
    let d = Daemon::start(&(header() + &owned("web", p, &[], "")));
    d.wait_state("web", 0, Running, T);
    d.write_config(&(header() + &owned("web", p, &["--never-ready"], "ready_timeout = \"2s\"")));
    let r1 = d.ctl_in_background(&["reload"]);
    wait_for("reload 1 to be applied", T, || {
        if d.stderr().contains("configuration reloaded") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    d.write_config(&(header() + &owned("web", p, &[], "environment = { V = \"2\" }")));
    let r2 = d.ctl_in_background(&["reload"]);
    let out1 = r1.join().expect("join");
    assert_eq!(out1.status.code(), Some(1), "{out1:?}");
    let out2 = r2.join().expect("join");
    assert!(out2.status.success(), "reload 2 (a good change): {out2:?}");
}

/// `bind_all` binds every address of the new file that zdt does not own yet,
/// including those of unchanged programs whose bind failed before: while
/// one program's port is taken, every reload is rejected, even one that only
/// changes another program.
#[test]
fn an_unbindable_unchanged_program_does_not_block_other_changes() {
    let (p1, p2) = (free_port(), free_port());
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", p1)).expect("bind");
    let a = owned("a", p1, &[], "autostart = false");
    let d = Daemon::start(&(header() + &a + &owned("b", p2, &[], "")));
    d.wait_state("b", 0, Running, T);
    d.write_config(&(header() + &a + &owned("b", p2, &[], "environment = { V = \"2\" }")));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "a change to b only: {out:?}");
}

/// `strategy = "rolling"`: instance 0 switches to the new settings, instance
/// 1 never gets ready. The program keeps its previous settings: a crash of
/// instance 1's old worker respawns the old command.
#[test]
fn a_rolling_reload_that_fails_halfway_keeps_the_previous_settings() {
    let p = free_port();
    let demo = bin("zdt-demo").display().to_string();
    let prog = |script: &str, extra: &str| {
        format!(
            "[program.web]\ncommand = [\"sh\", \"-c\", {script:?}]\nlisten = [\"tcp://127.0.0.1:{p}\"]\nready = {{ notify = true }}\nstartsecs = \"0s\"\ninstances = 2\nstrategy = \"rolling\"\nready_timeout = \"1s\"\n{extra}\n"
        )
    };
    let d = Daemon::start(&(header() + &prog(&format!("exec {demo}"), "")));
    d.wait_state("web", 0, Running, T);
    let old1 = d.wait_state("web", 1, Running, T).pid.expect("pid");
    d.write_config(
        &(header()
            + &prog(
                &format!("if [ \"$ZDT_INSTANCE\" = 1 ]; then exec {demo} --never-ready; else exec {demo}; fi"),
                "environment = { RELEASE = \"new\" }",
            )),
    );
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("previous settings"), "{text}");
    assert_eq!(d.instance("web", 1).pid, Some(old1));
    kill(old1, libc::SIGKILL);
    let again = wait_for("instance 1 respawned with the previous settings", T, || {
        let i = d.instance("web", 1);
        match (i.pid, i.state) {
            (Some(pid), Running) if pid != old1 => Ok(pid),
            _ => Err(format!("{i:?}")),
        }
    });
    let env = std::fs::read(format!("/proc/{again}/environ")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&env).contains("RELEASE=new"),
        "respawned with the rejected settings"
    );
}

#[test]
fn reload_dry_run_says_what_would_change_and_changes_nothing() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let keep = prog("keep", pa, "");
    let d = Daemon::start(&(header() + &keep + &prog("gone", pb, "") + &prog("changed", pc, "")));
    let before: Vec<_> = ["keep", "gone", "changed"]
        .iter()
        .map(|n| d.wait_state(n, 0, Running, T).pid)
        .collect();
    d.write_config(
        &(header()
            + &keep
            + &prog("changed", pc, "environment = { FLAVOUR = \"new\" }")
            + &prog("new", free_port(), "")),
    );
    let out = d.ctl(&["reload", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("a reload would add new; remove gone; restart changed (changed); leave keep (nothing was changed)"),
        "{text}"
    );
    let (code, v) = d.ctl_json(&["reload", "--dry-run"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(v["added"][0], "new", "{v}");
    // Nothing moved.
    let names: Vec<String> = d.status().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["changed", "gone", "keep"]);
    let after: Vec<_> = ["keep", "gone", "changed"]
        .iter()
        .map(|n| d.instance(n, 0).pid)
        .collect();
    assert_eq!(before, after);
    // A file with an error is reported as a reload would report it.
    d.write_config(&(header() + "[program.x]\ncommand = [\"x\"]\nnope = 1\n"));
    let out = d.ctl(&["reload", "--dry-run"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("supervisor.toml:7:1: unknown field `nope`"),
        "{err}"
    );
}

/// Programs can live in included files, and a `[group.NAME]` is a target:
/// `restart NAME` restarts its programs and no other, `NAME:PROGRAM` one of
/// them. A reload that includes a missing file changes nothing and says
/// where the include is.
#[test]
fn included_programs_and_groups_are_targets_and_a_bad_include_changes_nothing() {
    let nap = |name: &str| {
        format!("[program.{name}]\ncommand = [\"sleep\", \"300\"]\nstartsecs = \"0s\"\n")
    };
    let d = Daemon::start(&(header() + &nap("web")));
    let web = d.wait_state("web", 0, Running, T).pid.expect("pid");
    std::fs::create_dir_all(d.path("conf.d")).expect("mkdir");
    std::fs::write(
        d.path("conf.d/jobs.toml"),
        nap("queue") + &nap("cron") + "[group.jobs]\nprograms = [\"queue\", \"cron\"]\n",
    )
    .expect("write");
    let main = format!("include = [\"conf.d/*.toml\"]\n{}{}", header(), nap("web"));
    d.write_config(&main);
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let queue = d.wait_state("queue", 0, Running, T).pid.expect("pid");
    let cron = d.wait_state("cron", 0, Running, T).pid.expect("pid");

    let out = d.ctl(&["restart", "jobs"]);
    assert!(out.status.success(), "{out:?}");
    let queue2 = d.wait_state("queue", 0, Running, T).pid.expect("pid");
    let cron2 = d.wait_state("cron", 0, Running, T).pid.expect("pid");
    assert!(queue2 != queue && cron2 != cron, "both restarted");
    assert_eq!(
        d.instance("web", 0).pid,
        Some(web),
        "web is not in the group"
    );

    let (code, v) = d.ctl_json(&["stop", "jobs:queue"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(d.instance("queue", 0).state, Stopped);
    assert_eq!(d.instance("cron", 0).pid, Some(cron2));
    let (code, v) = d.ctl_json(&["status", "jobs:*"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["programs"].as_array().map(Vec::len), Some(2), "{v}");
    let out = d.ctl(&["restart", "jobs:web"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("group \"jobs\" has no program \"web\""),
        "{out:?}"
    );

    // The include names a file that is not there: refused with its place.
    d.write_config(&main.replace("conf.d/*.toml", "conf.d/gone.toml"));
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("supervisor.toml:1:12:") && text.contains("conf.d/gone.toml"),
        "{text}"
    );
    assert_eq!(d.instance("cron", 0).pid, Some(cron2), "nothing changed");
}

/// `zdtctl scale` 2 → 4 → 1 under load, then a reload of the unchanged file
/// (instances = 2): instances are added and removed while the others run
/// on (their pids do not change), and no request fails.
fn scale_under_load(program: String, port: u16) {
    let d = Daemon::start(&(header() + &program));
    let first = [0, 1].map(|i| d.wait_state("web", i, Running, T).pid.expect("pid"));
    wait_for("the port to answer", T, || http_get(port, "/"));
    let load = Load::start(port, 16, 4, &[0, 0, 20]);
    load.wait_progress("load before scaling");
    let pids = |d: &Daemon| -> Vec<Option<u32>> {
        let snap = d.status();
        let web = snap.iter().find(|p| p.name == "web").expect("web");
        let mut rows: Vec<_> = web.instances.iter().map(|i| (i.instance, i.pid)).collect();
        rows.sort();
        rows.dedup_by_key(|r| r.0);
        rows.into_iter().map(|(_, pid)| pid).collect()
    };

    let (code, v) = d.ctl_json(&["scale", "web", "4"]);
    assert_eq!(code, 0, "{v}");
    let now = pids(&d);
    assert_eq!(now.len(), 4, "{now:?}");
    assert_eq!(&now[..2], &first.map(Some), "the first two run on");
    let added: Vec<u32> = now[2..].iter().map(|p| p.expect("running")).collect();
    load.wait_progress("load after growing");
    let (code, v) = d.ctl_json(&["scale", "web", "1"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(pids(&d), [Some(first[0])], "only instance 0 is left");
    for pid in added.iter().chain(&first[1..]) {
        assert!(!alive(*pid), "removed worker {pid} exited");
    }
    load.wait_progress("load after shrinking");
    // The file says 2: a reload brings instance 1 back, instance 0 runs on.
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    d.wait_state("web", 1, Running, T);
    assert_eq!(d.instance("web", 0).pid, Some(first[0]));
    load.wait_progress("load after the reload");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(
        added.iter().all(|p| report.pids.contains(&u64::from(*p))),
        "the added instances served: {:?} of {:?}",
        added,
        report.pids
    );
    // Bad counts are refused by zdtctl and by zdt.
    let out = d.ctl(&["scale", "web", "0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let (code, v) = d.ctl_json(&["scale", "web:0", "2"]);
    assert_ne!(code, 0, "{v}");
}

#[test]
fn scale_in_pass_mode_adds_and_removes_instances_with_zero_failed_requests() {
    let port = free_port();
    scale_under_load(owned("web", port, &[], "instances = 2"), port);
}

#[test]
fn scale_in_proxy_mode_adds_and_removes_instances_with_zero_failed_requests() {
    let port = free_port();
    scale_under_load(
        demo_program(
            "web",
            &[],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                 ready = {{ http = \"/health\" }}\ninstances = 2"
            ),
        ),
        port,
    );
}

/// A reload that changes `instances` and something else: the count changes
/// first, then every instance is replaced with the new settings, without a
/// failed request (before, such a reload stopped the program, then started
/// it).
#[test]
fn a_reload_changing_instances_and_settings_fails_zero_requests() {
    let port = free_port();
    let prog = |n: u32, env: &str| {
        // Each worker takes 300 ms to start listening.
        demo_program(
            "web",
            &["--start-delay", "300"],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                 ready = {{ http = \"/health\" }}\ninstances = {n}\n\
                 environment = {{ RELEASE = \"{env}\" }}\n\
                 # Requests find no instance for at most this long: a stop\n\
                 # then start would fail them.\nqueue_timeout = \"100ms\""
            ),
        )
    };
    let d = Daemon::start(&(header() + &prog(2, "a")));
    let old = [0, 1].map(|i| d.wait_state("web", i, Running, T).pid.expect("pid"));
    wait_for("the port to answer", T, || http_get(port, "/"));
    let load = Load::start(port, 16, 4, &[0, 0, 20]);
    load.wait_progress("load before the reload");
    d.write_config(&(header() + &prog(3, "b")));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let new: Vec<u32> = (0..3)
        .map(|i| d.wait_state("web", i, Running, T).pid.expect("pid"))
        .collect();
    for pid in &new {
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        assert!(
            env.split(|b| *b == 0).any(|v| v == b"RELEASE=b"),
            "pid {pid} runs the new settings"
        );
        assert!(!old.contains(pid));
    }
    load.wait_progress("load after the reload");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
}

/// `watch`: a change under a watched path restarts the program without a
/// failed request, once the changes stop for the debounce time (five writes,
/// one restart); ignored names and zdt's own logs and sockets under the
/// watched folder restart nothing.
#[test]
fn watch_restarts_on_a_change_once_the_changes_settle() {
    let port = free_port();
    let prog = |extra: &str| {
        demo_program(
            "web",
            &[],
            &format!(
                "mode = \"proxy\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n\
                 ready = {{ http = \"/health\" }}\n{extra}"
            ),
        )
    };
    let d = Daemon::start(&(header() + &prog("")));
    d.wait_state("web", 0, Running, T);
    std::fs::create_dir_all(d.path("src")).expect("mkdir");
    std::fs::create_dir_all(d.path("node_modules/x")).expect("mkdir");
    for i in 0..50 {
        std::fs::create_dir_all(d.path(&format!("node_modules/x/m{i}"))).expect("mkdir");
    }
    // The whole folder: logs/ and run/ (zdt's own files) are in it, and
    // the test's copy of zdt's stderr, which watch_ignore names.
    d.write_config(
        &(header()
            + &prog(
                "watch = [\".\"]\nwatch_debounce = \"1s\"\n\
                 watch_ignore = [\"zdt.stderr\", \"node_modules\", \"*.swp\"]",
            )),
    );
    assert!(d.ctl(&["reload"]).status.success());
    let before = d.wait_state("web", 0, Running, T);
    // Folders are watched one by one, node_modules' not at all: the folder,
    // src/ (logs/ and run/ are zdt's, node_modules ignored).
    let watches = wait_for("zdt's inotify watches", T, || {
        match inotify_watches(d.pid()) {
            0 => Err("none yet".into()),
            n => Ok(n),
        }
    });
    assert_eq!(watches, 2, "watches");
    wait_for("the proxy to answer", T, || http_get(port, "/"));
    let load = Load::start(port, 8, 2, &[0, 0, 20]);
    load.wait_progress("load before the changes");
    let restarted = |n: u32| {
        wait_for(&format!("restart {n} by the watch"), T, || {
            let i = d.instance("web", 0);
            if i.generation >= before.generation + u64::from(n) && i.state == Running {
                Ok(i)
            } else {
                Err(format!("{i:?}"))
            }
        })
    };
    std::fs::write(d.path("node_modules/x/index.js"), "ignored").expect("write");
    std::fs::write(d.path("src/.app.js.swp"), "ignored").expect("write");
    for i in 0..5 {
        std::fs::write(d.path("src/app.js"), format!("version {i}")).expect("write");
    }
    let first = restarted(1);
    assert_eq!(
        first.restarts,
        before.restarts + 1,
        "five writes, one restart"
    );
    assert_ne!(first.pid, before.pid);
    load.wait_progress("load after the first restart");
    // A folder made now is watched once its creation is seen (which is a
    // change too); a write in it then restarts again.
    std::fs::create_dir_all(d.path("src/lib")).expect("mkdir");
    let second = restarted(2);
    assert_eq!(second.generation, before.generation + 2);
    wait_for("the new folder watched", T, || {
        match inotify_watches(d.pid()) {
            3 => Ok(()),
            n => Err(format!("{n} watches")),
        }
    });
    std::fs::write(d.path("src/lib/other.js"), "more").expect("write");
    let second = restarted(3);
    assert_eq!(second.generation, before.generation + 3);
    load.wait_progress("load after the last restart");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    let log = d.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("watch: files changed; restarting"))
        .collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(lines[0].contains("src/app.js"), "{}", lines[0]);
    assert!(lines[1].contains("src/lib"), "{}", lines[1]);
    assert!(lines[2].contains("src/lib/other.js"), "{}", lines[2]);
}

/// How many inotify watches process `pid` holds (its fdinfo lists them).
fn inotify_watches(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:inotify")
        })
        .map(|fd| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .filter(|l| l.starts_with("inotify wd:"))
                .count()
        })
        .sum()
}

/// `scale` to the count a program has changes nothing; a stopped program
/// takes a new count and stays stopped; a `start` while removed instances
/// still stop does not bring them back, and they are dropped once gone.
#[test]
fn scale_to_the_same_count_or_of_a_stopped_program_starts_and_restarts_nothing() {
    let port = free_port();
    // Ignores SIGTERM: a removed instance takes kill_timeout to go.
    let d = Daemon::start(
        &(header()
            + &owned(
                "web",
                port,
                &["--ignore-term"],
                "instances = 2\nkill_timeout = \"2s\"",
            )),
    );
    let first = [0, 1].map(|i| d.wait_state("web", i, Running, T).pid.expect("pid"));
    let count = |d: &Daemon| {
        let snap = d.status();
        let web = snap.iter().find(|p| p.name == "web").expect("web");
        let mut rows: Vec<u32> = web.instances.iter().map(|i| i.instance).collect();
        rows.dedup();
        rows.len()
    };

    let (code, v) = d.ctl_json(&["scale", "web", "2"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!([0, 1].map(|i| d.instance("web", i).pid), first.map(Some));

    // Shrink to 1; while instance 1 takes its kill_timeout, `start web`.
    let shrink = d.ctl_in_background(&["scale", "web", "1"]);
    wait_for("instance 1 stopping", T, || {
        match d.instance("web", 1).state {
            Stopping => Ok(()),
            s => Err(format!("{s:?}")),
        }
    });
    let out = d.ctl(&["start", "web"]);
    assert!(out.status.success(), "{out:?}");
    let out = shrink.join().expect("scale");
    assert!(out.status.success(), "{out:?}");
    assert!(!alive(first[1]), "the removed instance is gone");
    assert_eq!(count(&d), 1, "{:?}", d.status());
    assert_eq!(d.instance("web", 0).pid, Some(first[0]));

    // Stopped, then scaled: it stays stopped, with the new count.
    assert!(d.ctl(&["stop", "web"]).status.success());
    let (code, v) = d.ctl_json(&["scale", "web", "3"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(count(&d), 3);
    for i in 0..3 {
        assert_eq!(d.instance("web", i).state, Stopped, "{:?}", d.status());
    }
    assert!(d.ctl(&["start", "web"]).status.success());
    for i in 0..3 {
        d.wait_state("web", i, Running, T);
    }
}
