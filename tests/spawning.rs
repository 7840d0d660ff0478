//! What a worker gets: user, directory (symlinks resolved), environment, and
//! what happens to its orphans and its output when the disk is full.

use std::time::Duration;

use zdt::state::InstanceState::*;

use crate::util::*;

const T: Duration = Duration::from_secs(15);

fn proc_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn directory_symlink_is_resolved_at_spawn_and_env_is_set() {
    let d = Daemon::start(&header());
    let rel1 = d.path("releases/1");
    let rel2 = d.path("releases/2");
    std::fs::create_dir_all(&rel1).expect("mkdir");
    std::fs::create_dir_all(&rel2).expect("mkdir");
    std::os::unix::fs::symlink(&rel1, d.path("current")).expect("symlink");
    d.write_config(
        &(header()
            + "[program.app]\ncommand = [\"sleep\", \"1000\"]\ndirectory = \"current\"\nstartsecs = \"0s\"\nenvironment = { APP_ENV = \"prod\" }\n"),
    );
    assert!(d.ctl(&["reload"]).status.success());
    let pid = d.wait_state("app", 0, Running, T).pid.expect("pid");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    assert_eq!(cwd, rel1.canonicalize().expect("canon"));
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let env = String::from_utf8_lossy(&env);
    for want in [
        "APP_ENV=prod",
        "ZDT_PROGRAM=app",
        "ZDT_INSTANCE=0",
        "ZDT_GENERATION=1",
    ] {
        assert!(env.split('\0').any(|v| v == want), "{want} missing");
    }
    // Switch the release; the next generation starts in it.
    std::fs::remove_file(d.path("current")).expect("rm link");
    std::os::unix::fs::symlink(&rel2, d.path("current")).expect("symlink");
    assert!(d.ctl(&["restart", "app"]).status.success());
    let pid2 = d.wait_state("app", 0, Running, T).pid.expect("pid");
    let cwd = std::fs::read_link(format!("/proc/{pid2}/cwd")).expect("cwd");
    assert_eq!(cwd, rel2.canonicalize().expect("canon"));
}

#[test]
fn worker_runs_as_the_configured_user_when_zdt_is_root() {
    if !nix::unistd::geteuid().is_root() {
        // As non-root the config is rejected; the config tests cover that.
        return;
    }
    let d = Daemon::start(
        &(header()
            + "[program.app]\ncommand = [\"sleep\", \"1000\"]\nuser = \"nobody\"\numask = \"027\"\nstartsecs = \"0s\"\n"),
    );
    let pid = d.wait_state("app", 0, Running, T).pid.expect("pid");
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("nobody exists");
    let uids = proc_field(pid, "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == nobody.uid.to_string()),
        "Uid: {uids}"
    );
    assert_eq!(proc_field(pid, "Umask:"), "0027");
    let groups = proc_field(pid, "Groups:");
    assert!(
        !groups.split_whitespace().any(|g| g == "0"),
        "kept root's groups: {groups}"
    );
}

#[test]
fn orphans_of_workers_are_reaped_by_zdt() {
    let d = Daemon::start(&header());
    let script = "(sh -c 'sleep 0.3; awk \"{print \\$4}\" /proc/$$/stat > ppid.txt; sleep 0.3' &) ; exec sleep 1000";
    d.write_config(
        &(header()
            + &format!(
                "[program.app]\ncommand = [\"sh\", \"-c\", {script:?}]\ndirectory = \".\"\nstartsecs = \"0s\"\n"
            )),
    );
    assert!(d.ctl(&["reload"]).status.success());
    d.wait_state("app", 0, Running, T);
    let ppid = wait_for("the orphan to report its parent", T, || {
        std::fs::read_to_string(d.path("ppid.txt"))
            .ok()
            .filter(|s| s.ends_with('\n'))
            .ok_or_else(|| "no file yet".to_string())
    });
    assert_eq!(
        ppid.trim(),
        d.pid().to_string(),
        "orphan was not re-parented to zdt"
    );
    // Once it exits, zdt reaps it: no zombie child of zdt remains.
    wait_for("no zombie children of zdt", T, || {
        let zombies: Vec<String> = std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                let Some((_, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.first() == Some(&"Z") && f.get(1) == Some(&d.pid().to_string().as_str())
            })
            .collect();
        if zombies.is_empty() {
            Ok(())
        } else {
            Err(format!("{zombies:?}"))
        }
    });
}

#[test]
fn a_full_disk_drops_log_bytes_but_the_worker_keeps_serving() {
    let port = free_port();
    let d = Daemon::start(
        &(header()
            + &demo_program(
                "web",
                &["--port", &port.to_string()],
                "startsecs = \"0s\"\nstdout_logfile = \"/dev/full\"\nstdout_logfile_maxbytes = \"1KB\"",
            )),
    );
    let pid = d.wait_state("web", 0, Running, T).pid;
    wait_for("the worker to answer", T, || http_get(port, "/"));
    for _ in 0..5 {
        assert_eq!(
            http_get(port, "/log?n=100&stream=stdout").expect("log").0,
            200
        );
    }
    let st = wait_for("dropped bytes in status", T, || {
        let i = d.instance("web", 0);
        if i.log_dropped_bytes > 10_000 {
            Ok(i)
        } else {
            Err(format!("{i:?}"))
        }
    });
    assert_eq!(st.pid, pid, "the worker was restarted");
    assert_eq!(st.state, Running);
    let out = d.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("log bytes dropped"),
        "{out:?}"
    );
    // The ring still has the output for tail.
    let out = d.ctl(&["tail", "web"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("log line"));
    assert!(std::path::Path::new("/dev/full").exists());
}

/// `/proc/PID/limits`'s soft and hard values of the line named `name`.
fn proc_limit(pid: u32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    let mut fields = line[name.len()..].split_whitespace();
    let soft = fields.next().unwrap_or_default().to_string();
    let hard = fields.next().unwrap_or_default().to_string();
    (soft, hard)
}

#[test]
fn a_programs_limits_are_what_its_worker_sees() {
    let d = Daemon::start(
        &(header()
            + "[program.app]\ncommand = [\"sleep\", \"1000\"]\nstartsecs = \"0s\"\nlimits = { nofile = 4321, core = 0, fsize = \"unlimited\" }\n\n[program.plain]\ncommand = [\"sleep\", \"1000\"]\nstartsecs = \"0s\"\n"),
    );
    let pid = d.wait_state("app", 0, Running, T).pid.expect("pid");
    assert_eq!(
        proc_limit(pid, "Max open files"),
        ("4321".into(), "4321".into())
    );
    assert_eq!(
        proc_limit(pid, "Max core file size"),
        ("0".into(), "0".into())
    );
    assert_eq!(
        proc_limit(pid, "Max file size"),
        ("unlimited".into(), "unlimited".into())
    );
    // Without `limits`, the worker gets the open-files limit zdt was
    // started with, not the one zdt raised for itself.
    let plain = d.wait_state("plain", 0, Running, T).pid.expect("pid");
    let zdt = proc_limit(d.pid(), "Max open files");
    let worker = proc_limit(plain, "Max open files");
    assert_ne!(worker.0, "4321");
    assert_eq!(worker.1, zdt.1, "the hard limit is zdt's");
}

/// `NAME=value` of the process's environment.
fn environ(pid: u32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
}

#[test]
fn an_env_file_reaches_the_worker_and_a_reload_applies_its_change() {
    let d = Daemon::start(&header());
    std::fs::write(
        d.path(".env"),
        "# the app's settings\nDB_URL=postgres://db/app\nMODE=one\n",
    )
    .expect("write .env");
    d.write_config(
        &(header()
            + "[program.app]\ncommand = [\"sleep\", \"1000\"]\nstartsecs = \"0s\"\nenv_file = \".env\"\nenvironment = { MODE = \"config\" }\n"),
    );
    assert!(d.ctl(&["reload"]).status.success());
    let pid = d.wait_state("app", 0, Running, T).pid.expect("pid");
    assert_eq!(environ(pid, "DB_URL").as_deref(), Some("postgres://db/app"));
    assert_eq!(
        environ(pid, "MODE").as_deref(),
        Some("config"),
        "environment wins"
    );
    std::fs::write(d.path(".env"), "DB_URL=postgres://db/other\n").expect("write .env");
    let out = d.ctl(&["reload"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("changed app"),
        "{out:?}"
    );
    let again = wait_for("the worker with the new .env", T, || {
        let i = d.instance("app", 0);
        match i.pid {
            Some(p) if p != pid && i.state == Running => Ok(p),
            _ => Err(format!("{i:?}")),
        }
    });
    assert_eq!(
        environ(again, "DB_URL").as_deref(),
        Some("postgres://db/other")
    );
}
