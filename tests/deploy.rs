//! `zdtctl deploy`, `releases`, `rollback`: real releases of a real Node
//! and `php -S` app, deployed under concurrent load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::load::Load;
use crate::util::{bin, free_port, header, http_get, wait_for, Daemon};

const T: Duration = Duration::from_secs(20);

fn contrib(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A source folder for a release: the contrib app and a VERSION file.
fn source(d: &Daemon, name: &str, app: &str, version: &str) -> PathBuf {
    let dir = d.path(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = Path::new(app).file_name().expect("file name");
    std::fs::copy(contrib(app), dir.join(file)).expect("copy app");
    std::fs::write(dir.join("VERSION"), version).expect("write VERSION");
    dir
}

/// A source whose build (or migration) fails: it has a FAIL file.
fn failing_source(d: &Daemon, name: &str) -> PathBuf {
    let dir = source(d, name, "contrib/node/server.js", name);
    std::fs::write(dir.join("FAIL"), "").expect("write FAIL");
    dir
}

fn node_program(port: u16, mode: &str) -> String {
    let ready = if mode == "pass" {
        "ready = { notify = true }".to_string()
    } else {
        "ready = { http = \"/\" }".to_string()
    };
    format!(
        "[program.web]\ncommand = [\"node\", \"server.js\"]\ndirectory = \"root/current\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nmode = \"{mode}\"\n{ready}\ninstances = 2\nenvironment = {{ ZDT_BIN = {:?} }}\n\n[program.web.deploy]\nroot = \"root\"\nshared = [\"storage\", \".env\"]\nkeep_releases = 3\n",
        bin("zdt").display().to_string()
    )
}

fn php_program(port: u16) -> String {
    format!(
        "[program.web]\ncommand = [\"php\", \"-S\", \"127.0.0.1:{{port}}\", \"{{release}}/app.php\"]\ndirectory = \"root/current\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nmode = \"proxy\"\nready = {{ http = \"/health\" }}\nenvironment = {{ PHP_CLI_SERVER_WORKERS = \"4\" }}\n\n[program.web.deploy]\nroot = \"root\"\nkeep_releases = 3\n"
    )
}

fn deploy(d: &Daemon, from: &Path) -> std::process::Output {
    d.ctl(&["deploy", "web", "--from", &from.display().to_string()])
}

/// The JSON object in a body (php -S answers chunked: the framing around it
/// is left out).
fn json_in(body: &str) -> serde_json::Value {
    let object = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if a < b => &body[a..=b],
        _ => body,
    };
    serde_json::from_str(object).unwrap_or_else(|e| panic!("no JSON in {body:?}: {e}"))
}

fn version_of(port: u16) -> String {
    let (code, body) = http_get(port, "/").expect("answered");
    assert_eq!(code, 200, "{body}");
    json_in(&body)["version"].as_str().unwrap_or("").to_string()
}

fn current(d: &Daemon) -> String {
    std::fs::read_link(d.path("root/current"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn wait_load(load: &Load, what: &str) {
    let before = load.ok_so_far();
    wait_for(what, T, || {
        if load.ok_so_far() > before + 100 {
            Ok(())
        } else {
            Err("slow".into())
        }
    });
}

/// Deploys v1 and v2 in turn `rounds` times under 32 clients: zero
/// failures, and each deploy's version answers once it returned.
fn deploys_under_load(d: &Daemon, port: u16, app: &str, rounds: usize) {
    let v1 = source(d, "v1", app, "v1");
    let v2 = source(d, "v2", app, "v2");
    let out = deploy(d, &v1);
    assert!(out.status.success(), "first deploy: {out:?}");
    assert_eq!(version_of(port), "v1");
    let load = Load::start(port, 16, 16, &[0, 0, 20, 100]);
    for i in 0..rounds {
        wait_load(&load, "load between deploys");
        let (from, want) = if i % 2 == 0 { (&v2, "v2") } else { (&v1, "v1") };
        let out = deploy(d, from);
        assert!(
            out.status.success(),
            "deploy {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(version_of(port), want, "after deploy {i}");
    }
    wait_load(&load, "load after the last deploy");
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.errors);
    assert!(
        report.versions.contains_key("v1") && report.versions.contains_key("v2"),
        "{:?}",
        report.versions
    );
    // keep_releases = 3: older releases were pruned.
    let left = std::fs::read_dir(d.path("root/releases"))
        .expect("releases")
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(left, 3);
}

#[test]
fn twenty_deploys_of_a_node_app_in_pass_mode_fail_zero_requests() {
    let port = free_port();
    let d = Daemon::start(&(header() + &node_program(port, "pass")));
    deploys_under_load(&d, port, "contrib/node/server.js", 20);
}

#[test]
fn twenty_deploys_of_a_node_app_in_proxy_mode_fail_zero_requests() {
    let port = free_port();
    let d = Daemon::start(&(header() + &node_program(port, "proxy")));
    deploys_under_load(&d, port, "contrib/node/server.js", 20);
}

#[test]
fn twenty_deploys_of_a_php_app_in_proxy_mode_fail_zero_requests() {
    let port = free_port();
    let d = Daemon::start(&(header() + &php_program(port)));
    deploys_under_load(&d, port, "contrib/php/app.php", 20);
}

#[test]
fn a_request_begun_before_the_switch_reads_its_old_release() {
    let port = free_port();
    let d = Daemon::start(&(header() + &php_program(port)));
    let v1 = source(&d, "v1", "contrib/php/app.php", "v1");
    let v2 = source(&d, "v2", "contrib/php/app.php", "v2");
    assert!(deploy(&d, &v1).status.success());
    // The app reads VERSION after its sleep: after the switch.
    let slow = std::thread::spawn(move || http_get(port, "/?sleep=1500"));
    d.wait_inflight("web", 1, T);
    let out = deploy(&d, &v2);
    assert!(out.status.success(), "{out:?}");
    let (code, body) = slow.join().expect("join").expect("slow request answered");
    assert_eq!(code, 200);
    assert_eq!(json_in(&body)["version"], "v1", "{body}");
    assert_eq!(version_of(port), "v2");
}

#[test]
fn a_failing_build_changes_nothing_and_fails_no_request() {
    let port = free_port();
    let config = header()
        + &node_program(port, "proxy")
        + "build = [[\"sh\", \"-c\", \"echo building; if [ -f FAIL ]; then echo broken build >&2; exit 3; fi\"]]\n";
    let d = Daemon::start(&config);
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let bad = failing_source(&d, "bad");
    let out = deploy(&d, &v1);
    assert!(out.status.success(), "{out:?}");
    let live = current(&d);
    let load = Load::start(port, 16, 16, &[0, 20]);
    wait_load(&load, "load before the deploy");
    let out = deploy(&d, &bad);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("build 1/1") && stderr.contains("broken build"),
        "{stderr}"
    );
    // The output was streamed as it came.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("| building"),
        "{out:?}"
    );
    wait_load(&load, "load after the deploy");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(current(&d), live);
    assert_eq!(version_of(port), "v1");
    let (_, v) = d.ctl_json(&["releases", "web"]);
    let rows = v["releases"].as_array().expect("rows").clone();
    assert_eq!(rows.len(), 2, "{v}");
    assert_eq!(rows[1]["state"], "failed", "{v}");
    assert!(
        rows[1]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("ended with"),
        "{v}"
    );
}

#[test]
fn a_release_that_never_gets_ready_is_switched_back() {
    let port = free_port();
    // A unix upstream: the broken release never binds its private address,
    // and a TCP port left free that long may be taken by a listener of a
    // test running alongside, which would answer the probe for it.
    let d = Daemon::start(&(header() + &node_program(port, "proxy")).replace(
        "ready = { http = \"/\" }",
        "ready = { http = \"/\" }\nready_timeout = \"2s\"\nupstream = \"unix\"",
    ));
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let broken = d.path("broken");
    std::fs::create_dir_all(&broken).expect("mkdir");
    std::fs::write(
        broken.join("server.js"),
        "console.log('broken release starting'); setInterval(() => {}, 1000);\n",
    )
    .expect("write");
    assert!(deploy(&d, &v1).status.success());
    let live = current(&d);
    let load = Load::start(port, 16, 16, &[0, 20]);
    wait_load(&load, "load before the deploy");
    let out = deploy(&d, &broken);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken release starting"), "{stderr}");
    wait_load(&load, "load after the deploy");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(current(&d), live);
    assert_eq!(version_of(port), "v1");
    let (_, v) = d.ctl_json(&["releases", "web"]);
    assert_eq!(v["releases"][1]["state"], "failed", "{v}");
}

#[test]
fn rollback_goes_back_under_load_and_releases_lists_states() {
    let port = free_port();
    let d = Daemon::start(&(header() + &node_program(port, "proxy")));
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let v2 = source(&d, "v2", "contrib/node/server.js", "v2");
    assert!(deploy(&d, &v1).status.success());
    assert!(deploy(&d, &v2).status.success());
    let (_, v) = d.ctl_json(&["releases", "web"]);
    let states: Vec<&str> = v["releases"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["previous", "live"], "{v}");
    let first = v["releases"][0]["id"].as_str().expect("id").to_string();
    let load = Load::start(port, 16, 16, &[0, 20]);
    wait_load(&load, "load before the rollback");
    let out = d.ctl(&["rollback", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(version_of(port), "v1");
    assert!(current(&d).ends_with(&first));
    wait_load(&load, "load after the rollback");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    // The shared paths are links into shared/, and RELEASE names the release.
    let rel = d.path("root/current");
    assert!(std::fs::symlink_metadata(rel.join("storage"))
        .expect("storage")
        .file_type()
        .is_symlink());
    let release_file = std::fs::read_to_string(rel.join("RELEASE")).expect("RELEASE");
    assert!(
        release_file.contains(&format!("id={first}")),
        "{release_file}"
    );
    // Every worker runs in the release it names.
    for i in d.status()[0].instances.iter() {
        assert_eq!(i.release.as_deref(), Some(first.as_str()), "{i:?}");
    }
    let out = d.ctl(&["rollback", "web", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_second_deploy_is_refused_and_an_interrupted_one_is_undone_at_the_next_start() {
    let port = free_port();
    let gate = tempfile::tempdir().expect("tempdir");
    let go = gate.path().join("go");
    let config = header()
        + &node_program(port, "proxy")
        + &format!(
            "build = [[\"sh\", \"-c\", \"if [ -f WAIT ]; then while [ ! -f {} ]; do sleep 0.05; done; fi\"]]\n",
            go.display()
        );
    let mut d = Daemon::start(&config);
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let slow = source(&d, "slow", "contrib/node/server.js", "slow");
    std::fs::write(slow.join("WAIT"), "").expect("write");
    assert!(deploy(&d, &v1).status.success());
    let live = current(&d);
    let first = d.ctl_in_background(&["deploy", "web", "--from", &slow.display().to_string()]);
    // Once the build runs, a second deploy is refused, naming the first.
    wait_for("the first deploy to build", T, || {
        let logs = std::fs::read_dir(d.path("root/.zdt/releases")).map_err(|e| e.to_string())?;
        let building = logs.filter_map(Result::ok).any(|e| {
            std::fs::read_to_string(e.path())
                .is_ok_and(|t| t.contains("WAIT") && t.ends_with(": running\n"))
        });
        if building {
            Ok(())
        } else {
            Err("no build running".into())
        }
    });
    let out = deploy(&d, &v1);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is running: deploy from") && stderr.contains("since"),
        "{stderr}"
    );
    // zdt dies in the middle of the build.
    d.signal(libc::SIGKILL);
    d.wait_exit(T);
    let _ = first.join();
    assert_eq!(current(&d), live);
    d.start_again();
    let (_, v) = d.ctl_json(&["releases", "web"]);
    assert_eq!(v["releases"][1]["state"], "failed", "{v}");
    assert!(
        v["releases"][1]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted"),
        "{v}"
    );
    wait_for("v1 to serve again", T, || match http_get(port, "/") {
        Ok((200, b)) if b.contains("\"version\":\"v1\"") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    std::fs::write(&go, "").expect("write");
}

#[test]
fn a_program_with_a_deploy_root_waits_for_its_first_release() {
    let port = free_port();
    let d = Daemon::start(&(header() + &node_program(port, "proxy")));
    let i = d.instance("web", 0);
    assert_eq!(i.state, zdt::state::InstanceState::Stopped, "{i:?}");
    let out = d.ctl(&["releases", "web"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no releases"),
        "{out:?}"
    );
    let out = d.ctl(&["deploy", "web", "--from", "/nonexistent/app"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/app"),
        "{out:?}"
    );
    assert!(!d.path("root/current").exists());
}

#[test]
fn deploy_with_pause_holds_requests_while_migrations_run() {
    let port = free_port();
    // The migration records when it ran; it fails when the release says so.
    let config = header()
        + &node_program(port, "proxy")
        + "migrate = [[\"sh\", \"-c\", \"date +%s%3N > $ZDT_DEPLOY_ROOT/migrate.start; sleep 1; date +%s%3N > $ZDT_DEPLOY_ROOT/migrate.end; test ! -f FAIL\"]]\n";
    let d = Daemon::start(&config);
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let v2 = source(&d, "v2", "contrib/node/server.js", "v2");
    let bad = failing_source(&d, "bad");
    assert!(deploy(&d, &v1).status.success());
    let load = Load::start(port, 16, 16, &[0, 20, 100]);
    wait_load(&load, "load before the deploy");
    let out = d.ctl(&[
        "deploy",
        "web",
        "--pause",
        "--from",
        &v2.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("paused web") && text.contains("migrate 1/1") && text.contains("resumed"),
        "{text}"
    );
    let ms = |f: &str| -> u64 {
        std::fs::read_to_string(d.path(&format!("root/{f}")))
            .expect("migration time")
            .trim()
            .parse()
            .expect("ms")
    };
    let (start, end) = (ms("migrate.start"), ms("migrate.end"));
    assert_eq!(version_of(port), "v2");
    // A migration that fails: nothing switched, requests resumed.
    let out = d.ctl(&[
        "deploy",
        "web",
        "--pause",
        "--max-pause",
        "20s",
        "--from",
        &bad.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("migrate 1/1"),
        "{out:?}"
    );
    wait_load(&load, "load after the failed migration");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    let during: Vec<&u64> = report
        .reached_ms
        .iter()
        .filter(|&&t| t > start && t < end)
        .collect();
    assert!(
        during.is_empty(),
        "{} requests reached a worker during the migration",
        during.len()
    );
    assert!(
        report.reached_ms.iter().any(|&t| t > end),
        "nothing served after it"
    );
    assert_eq!(version_of(port), "v2");
}

#[test]
fn a_program_with_a_user_gets_a_release_it_owns_and_builds_as_that_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a program as another user");
        return;
    }
    let port = free_port();
    let config = header()
        + &node_program(port, "proxy").replace("instances = 2", "instances = 1\nuser = \"nobody\"")
        + "build = [[\"sh\", \"-c\", \"id -un > built-by && mkdir -p cache\"]]\n";
    let d = Daemon::start(&config);
    // The test folder is private to root; the worker must reach its release.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let out = deploy(&d, &v1);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(version_of(port), "v1");
    let rel = d.path("root/current");
    assert_eq!(
        std::fs::read_to_string(rel.join("built-by"))
            .expect("built-by")
            .trim(),
        "nobody"
    );
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(rel.join("cache")).expect("cache").uid();
    assert_eq!(owner, 65534);
    let shared = std::fs::metadata(d.path("root/shared/storage"))
        .expect("shared")
        .uid();
    assert_eq!(shared, 65534, "shared paths belong to the user too");
}

/// Unmounts (lazily) when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_or_read_only_deploy_root_is_a_clear_error_and_nothing_changes() {
    let port = free_port();
    let d = Daemon::start(&(header() + &node_program(port, "proxy")));
    let root = d.path("root");
    std::fs::create_dir(&root).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&root)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot mount a small tmpfs here ({mounted:?})");
        return;
    }
    let _mount = Mount(root.clone());
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    assert!(deploy(&d, &v1).status.success());
    let live = current(&d);
    let big = source(&d, "big", "contrib/node/server.js", "big");
    std::fs::write(big.join("data.bin"), vec![7u8; 1024 * 1024]).expect("write");
    let out = deploy(&d, &big);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("No space left on device") && stderr.contains("data.bin"),
        "{stderr}"
    );
    assert_eq!(current(&d), live);
    let leftovers: Vec<_> = std::fs::read_dir(root.join("releases"))
        .expect("releases")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    let ro = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&root)
        .status()
        .expect("mount");
    assert!(ro.success());
    let out = deploy(&d, &v1);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
    assert_eq!(current(&d), live);
    assert_eq!(version_of(port), "v1");
}

#[test]
fn deploy_as_a_canary_then_promote_or_roll_back_fails_zero_requests() {
    let port = free_port();
    let d = Daemon::start(&(header() + &node_program(port, "proxy")));
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let v2 = source(&d, "v2", "contrib/node/server.js", "v2");
    assert!(deploy(&d, &v1).status.success());
    let first = current(&d);
    let load = Load::start(port, 16, 16, &[0, 20]);
    wait_load(&load, "load before the canary");
    let out = d.ctl(&[
        "deploy",
        "web",
        "--canary",
        "50",
        "--from",
        &v2.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let states = |d: &Daemon| -> Vec<String> {
        let (_, v) = d.ctl_json(&["releases", "web"]);
        v["releases"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r["state"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(states(&d), ["live", "canary"]);
    // Both releases serve while the canary runs; a new deploy waits for it.
    wait_for("both versions to answer", T, || {
        let n = load.versions();
        if n.get("v1").copied().unwrap_or(0) > 50 && n.get("v2").copied().unwrap_or(0) > 50 {
            Ok(())
        } else {
            Err(format!("{n:?}"))
        }
    });
    let out = deploy(&d, &v1);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("canary"),
        "{out:?}"
    );
    let out = d.ctl(&["promote", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(states(&d), ["previous", "live"]);
    assert_eq!(version_of(port), "v2");
    // A canary rolled back: current goes back, the release is failed.
    let promoted = current(&d);
    let out = d.ctl(&[
        "deploy",
        "web",
        "--canary",
        "50",
        "--from",
        &v1.display().to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_ne!(current(&d), promoted);
    let out = d.ctl(&["rollback", "web"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(current(&d), promoted);
    assert_eq!(states(&d), ["previous", "live", "failed"]);
    wait_load(&load, "load after the rollback");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    for _ in 0..20 {
        assert_eq!(version_of(port), "v2");
    }
    assert_ne!(first, promoted);
}

#[test]
fn programs_sharing_a_root_deploy_together_and_go_back_together() {
    let port = free_port();
    // The web server carries the settings; the queue worker names the root.
    let config = header()
        + &node_program(port, "proxy").replace("instances = 2", "instances = 2\npriority = 1")
        + "\n[program.queue]\ncommand = [\"sh\", \"-c\", \"if [ -f FAIL ]; then echo queue cannot start on this release; exit 1; fi; echo $ZDT_RELEASE > queue-ran; exec sleep 600\"]\ndirectory = \"root/current\"\npriority = 2\nstartretries = 0\nstartsecs = \"300ms\"\n[program.queue.deploy]\nroot = \"root\"\n";
    let d = Daemon::start(&config);
    let v1 = source(&d, "v1", "contrib/node/server.js", "v1");
    let v2 = source(&d, "v2", "contrib/node/server.js", "v2");
    let bad = failing_source(&d, "bad");
    assert!(deploy(&d, &v1).status.success());
    let load = Load::start(port, 16, 16, &[0, 20]);
    wait_load(&load, "load before the deploys");
    let out = deploy(&d, &v2);
    assert!(out.status.success(), "{out:?}");
    let live = current(&d);
    let id = live.rsplit('/').next().unwrap_or("").to_string();
    assert_eq!(
        std::fs::read_to_string(d.path("root/current/queue-ran"))
            .expect("queue ran")
            .trim(),
        id
    );
    for p in d.status() {
        for i in p.instances.iter().filter(|i| i.pid.is_some()) {
            assert_eq!(i.release.as_deref(), Some(id.as_str()), "{} {i:?}", p.name);
        }
    }
    // The queue worker fails on the next release: the web server, which had
    // moved to it already, goes back too.
    let out = deploy(&d, &bad);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("queue did not start") && stderr.contains("queue cannot start"),
        "{stderr}"
    );
    assert_eq!(current(&d), live);
    wait_load(&load, "load after the failed deploy");
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(version_of(port), "v2");
    // Both run on the release that was live before, the queue worker again.
    for p in d.status() {
        for i in &p.instances {
            assert_eq!(
                i.state,
                zdt::state::InstanceState::Running,
                "{} {i:?}",
                p.name
            );
            assert_eq!(i.release.as_deref(), Some(id.as_str()), "{} {i:?}", p.name);
        }
    }
}
