//! `zdt check` and startup on bad configuration files: the error names the
//! file, line and column, and nothing starts.

use std::process::Command;

use crate::util::*;

fn check(body: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("supervisor.toml");
    std::fs::write(&path, body).expect("write");
    let out = Command::new(bin("zdt"))
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("zdt check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

#[test]
fn bad_configs_are_rejected_with_line_and_column() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[program.web]\ncommand = [\"x\"]\ncomand = 1\n",
            ":3:1:",
            "comand",
        ),
        ("[program.web]\ncommand = []\n", ":2:11:", "empty"),
        (
            "[program.web]\ncommand = [\"x\"]\nstop_signal = \"TREM\"\n",
            ":3:15:",
            "TREM",
        ),
        (
            "[program.web]\ncommand = [\"x\"]\nmax_wait = \"10 parsecs\"\n",
            ":3:12:",
            "parsecs",
        ),
        (
            "[program.web]\ncommand = [\"x\"]\ninstances = \"two\"\n",
            ":3:13:",
            "",
        ),
        ("[supervisor]\ncontroll = \"x\"\n", ":2:1:", "controll"),
        (
            "[program.web]\ncommand = \"node 'app.js\"\n",
            ":2:11:",
            "quote",
        ),
        (
            "[program.web]\ncommand = [\"x\"]\nautorestart = \"sometimes\"\n",
            ":3:15:",
            "unexpected",
        ),
    ];
    for (body, pos, word) in cases {
        let (code, err, path) = check(body);
        assert_eq!(code, 2, "{body:?} was accepted: {err}");
        assert!(
            err.contains(&format!("{path}{pos}")),
            "{body:?}: want {pos} in {err:?}"
        );
        assert!(err.contains(word), "{body:?}: want {word:?} in {err:?}");
    }
}

#[test]
fn a_good_config_passes_check() {
    let (code, err, _) = check(&(header() + &demo_program("web", &[], "")));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn zdt_refuses_to_start_on_a_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("supervisor.toml");
    std::fs::write(&path, "[program.web]\ncommand = [\"x\"]\nnumprocs = 0\n").expect("write");
    let out = Command::new(bin("zdt"))
        .arg("-c")
        .arg(&path)
        .output()
        .expect("zdt");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(":3:"),
        "{out:?}"
    );
}

#[test]
fn the_example_configs_in_contrib_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "contrib/php/supervisor.toml",
        "contrib/php/hyperf.toml",
        "contrib/php/deploy.toml",
    ] {
        let out = std::process::Command::new(bin("zdt"))
            .args(["check", "-c"])
            .arg(root.join(file))
            .output()
            .expect("zdt check");
        assert!(out.status.success(), "{file}: {out:?}");
    }
}

#[test]
fn check_warns_of_a_command_that_is_not_on_path_and_still_accepts_the_file() {
    let (code, stderr, _) = check(
        "[program.gone]\ncommand = [\"no-such-command-of-zdt\", \"x\"]\n\n[program.abs]\ncommand = [\"/no/such/zdt-binary\"]\n\n[program.here]\ncommand = [\"sleep\", \"1\"]\n\n[program.own]\ncommand = [\"only-in-its-path\"]\nenvironment = { PATH = \"/nowhere\" }\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "warning: program gone: command \"no-such-command-of-zdt\" is not found on PATH"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "warning: program abs: command \"/no/such/zdt-binary\" is not an executable file"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("PATH (/nowhere)"),
        "the program's own PATH: {stderr}"
    );
    assert!(!stderr.contains("program here"), "{stderr}");
}
