//! Where releases come from: archives (and unsafe ones), git, and the
//! deploy watches of a git branch and an upload folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{bin, free_port, header, http_get, wait_for, Daemon};

const T: Duration = Duration::from_secs(30);

fn node_app(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/node/server.js");
    std::fs::copy(app, dir.join("server.js")).expect("copy app");
    std::fs::write(dir.join("VERSION"), version).expect("write VERSION");
}

fn program(port: u16, extra: &str) -> String {
    format!(
        "[program.web]\ncommand = [\"node\", \"server.js\"]\ndirectory = \"root/current\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\nmode = \"proxy\"\nready = {{ http = \"/\" }}\nenvironment = {{ ZDT_BIN = {:?} }}\n\n[program.web.deploy]\nroot = \"root\"\nbuild = [[\"sh\", \"-c\", \"if [ -f FAIL ]; then echo broken build; exit 1; fi\"]]\n{extra}",
        bin("zdt").display().to_string()
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .args([
            "-c",
            "user.name=zdt test",
            "-c",
            "user.email=test@zdt.invalid",
        ])
        .args(args)
        .current_dir(dir))
}

fn serves(port: u16, version: &str) -> Result<(), String> {
    match http_get(port, "/") {
        Ok((200, b)) if b.contains(&format!("\"version\":\"{version}\"")) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

fn tgz(src: &Path, to: &Path) {
    run(Command::new("tar")
        .arg("czf")
        .arg(to)
        .arg("-C")
        .arg(src)
        .arg("."));
}

fn releases(d: &Daemon) -> Vec<serde_json::Value> {
    let (_, v) = d.ctl_json(&["releases", "web"]);
    v["releases"].as_array().cloned().unwrap_or_default()
}

#[test]
fn archives_deploy_and_an_unsafe_one_writes_nothing_outside_the_release() {
    let port = free_port();
    let d = Daemon::start(&(header() + &program(port, "")));
    node_app(&d.path("v1"), "v1");
    let archive = d.path("app-v1.tar.gz");
    tgz(&d.path("v1"), &archive);
    let out = d.ctl(&["deploy", "web", "--from", "app-v1.tar.gz"]);
    // zdtctl runs in the test's folder; a relative SRC is the client's.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = d.ctl(&["deploy", "web", "--from", &archive.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    wait_for("v1 to serve", T, || serves(port, "v1"));
    let live = std::fs::read_link(d.path("root/current")).expect("current");
    // An archive with an entry that climbs out, and one with a link out.
    let outside = d.path("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    for (name, script) in [
        (
            "climb.tar.gz",
            "t.addfile(info('server.js', 5), io.BytesIO(b'x=1;\\n')); t.addfile(info('../../../outside/evil', 5), io.BytesIO(b'evil\\n'))",
        ),
        (
            "link.tar.gz",
            "l = tarfile.TarInfo('up'); l.type = tarfile.SYMTYPE; l.linkname = '../../../outside'; t.addfile(l); t.addfile(info('up/evil', 5), io.BytesIO(b'evil\\n'))",
        ),
    ] {
        let path = d.path(name);
        run(Command::new("python3").arg("-c").arg(format!(
            "import tarfile, io\ndef info(n, size):\n    i = tarfile.TarInfo(n); i.size = size; return i\nt = tarfile.open({:?}, 'w:gz')\n{script}\nt.close()\n",
            path.display().to_string()
        )));
        let out = d.ctl(&["deploy", "web", "--from", &path.display().to_string()]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refusing archive"), "{name}: {stderr}");
        assert!(
            std::fs::read_dir(&outside).expect("outside").next().is_none(),
            "{name} wrote outside the release"
        );
        assert_eq!(std::fs::read_link(d.path("root/current")).expect("current"), live);
    }
    serves(port, "v1").expect("still v1");
}

/// A bare repository at `repo` and a working copy at `work` that pushes to it.
fn init_repo(repo: &Path, work: &Path) {
    run(Command::new("git")
        .args(["init", "-q", "--bare", "-b", "main"])
        .arg(repo));
    run(Command::new("git")
        .args(["init", "-q", "-b", "main"])
        .arg(work));
    git(
        work,
        &["remote", "add", "origin", &repo.display().to_string()],
    );
}

fn bare_repo(d: &Daemon) -> (PathBuf, PathBuf) {
    let (repo, work) = (d.path("app.git"), d.path("work"));
    init_repo(&repo, &work);
    (repo, work)
}

fn push(work: &Path, version: &str, fail: bool) -> String {
    node_app(work, version);
    let flag = work.join("FAIL");
    if fail {
        std::fs::write(&flag, "").expect("write");
    } else {
        let _ = std::fs::remove_file(&flag);
    }
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", version]);
    git(work, &["push", "-q", "origin", "main"]);
    git(work, &["rev-parse", "HEAD"])
}

#[test]
fn a_git_ref_deploys_with_its_commit_recorded_and_a_missing_ref_is_refused() {
    let port = free_port();
    let d = Daemon::start(&(header() + &program(port, "")));
    let (repo, work) = bare_repo(&d);
    let sha = push(&work, "v1", false);
    let from = format!("git+file://{}#main", repo.display());
    let out = d.ctl(&["deploy", "web", "--from", &from]);
    assert!(out.status.success(), "{out:?}");
    serves(port, "v1").expect("v1");
    let rows = releases(&d);
    assert_eq!(rows[0]["commit"], sha.as_str());
    let id = rows[0]["id"].as_str().expect("id");
    assert!(id.ends_with(&sha[..7]), "{id}");
    assert!(!d.path("root/current/.git").exists());
    let out = d.ctl(&[
        "deploy",
        "web",
        "--from",
        &format!("git+{}#nope", repo.display()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{out:?}"
    );
    assert_eq!(releases(&d).len(), 1);
}

#[test]
fn a_git_watch_deploys_each_push_and_tries_a_broken_commit_once() {
    let port = free_port();
    let d0 = tempfile::tempdir().expect("tempdir");
    let repo = d0.path().join("app.git");
    let config = header()
        + &program(
            port,
            &format!(
                "[program.web.deploy.watch]\ngit = \"{}#main\"\ninterval = \"1s\"\n",
                repo.display()
            ),
        );
    let d = Daemon::start(&config);
    let work = d.path("work");
    init_repo(&repo, &work);
    push(&work, "v1", false);
    wait_for("the watch to deploy v1", T, || serves(port, "v1"));
    push(&work, "v2", false);
    wait_for("the watch to deploy v2", T, || serves(port, "v2"));
    let broken = push(&work, "v3", true);
    // The broken commit fails once, then the watch waits for a new one.
    wait_for("the watch to give up on the broken commit", T, || {
        let w = &d.status()[0].deploy_watch;
        match w.as_ref().and_then(|w| w.outcome.clone()) {
            Some(o) if o.contains("failed before") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let failed: Vec<_> = releases(&d)
        .into_iter()
        .filter(|r| r["state"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["commit"], broken.as_str());
    serves(port, "v2").expect("v2 still serves");
    // A restarted zdt remembers it too (from the failed release).
    let mut d = d;
    d.signal(libc::SIGTERM);
    d.wait_exit(T);
    d.start_again();
    wait_for(
        "the restarted watch to pass over the broken commit",
        T,
        || {
            let w = &d.status()[0].deploy_watch;
            match w.as_ref().and_then(|w| w.outcome.clone()) {
                Some(o) if o.contains("failed before") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
    let failed = releases(&d)
        .into_iter()
        .filter(|r| r["state"] == "failed")
        .count();
    assert_eq!(failed, 1);
    serves(port, "v2").expect("v2 serves after the restart");
}

#[test]
fn an_upload_watch_deploys_a_settled_archive_and_files_it() {
    let port = free_port();
    let config = header()
        + &program(
            port,
            "[program.web.deploy.watch]\nupload = \"incoming\"\nsettle = \"300ms\"\n",
        );
    let d = Daemon::start(&config);
    std::fs::create_dir(d.path("incoming")).expect("mkdir");
    node_app(&d.path("v1"), "v1");
    tgz(&d.path("v1"), &d.path("incoming/app-v1.tgz"));
    wait_for("the watch to deploy v1", T, || serves(port, "v1"));
    wait_for("the archive to be filed", T, || {
        if d.path("incoming/done/app-v1.tgz").exists() {
            Ok(())
        } else {
            Err("not in done/".into())
        }
    });
    let bad = d.path("bad");
    node_app(&bad, "bad");
    std::fs::write(bad.join("FAIL"), "").expect("write");
    tgz(&bad, &d.path("incoming/app-bad.tgz"));
    wait_for("the bad archive to be filed as failed", T, || {
        if d.path("incoming/failed/app-bad.tgz").exists() {
            Ok(())
        } else {
            Err("not in failed/".into())
        }
    });
    serves(port, "v1").expect("v1 still serves");
    let out = d.ctl(&["status", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("watch upload") && text.contains("app-bad.tgz failed"),
        "{text}"
    );
}
