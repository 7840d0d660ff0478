//! Shared helpers for the import tests, and tests of what the readers share.

use super::*;

/// Writes `files` (relative path, text) under a new temporary folder.
pub(crate) fn files(list: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in list {
        let p = dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, text).expect("write");
    }
    dir
}

/// The keys landing in zdt in parallel (`[group.NAME]`, `max_memory`,
/// `cron_restart`): lines and tables dropped so that the rest can be
/// checked before they land.
pub(crate) fn without_planned(text: &str) -> String {
    let mut out = String::new();
    let mut in_group = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_group = line.starts_with("[group.");
        }
        let planned = line.starts_with("max_memory =") || line.starts_with("cron_restart =");
        if !in_group && !planned {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Asserts that zdt's loader takes `text` (less the planned keys), as
/// `zdt check` would in `dir`.
pub(crate) fn assert_loads(text: &str, dir: &Path) {
    let checked = without_planned(text);
    if let Err(e) = crate::config::parse(&checked, &dir.join("supervisor.toml")) {
        panic!("zdt refuses the import:\n{}\n--- text:\n{text}", e.render());
    }
}

#[test]
fn the_format_comes_from_the_file_name() {
    for (name, f) in [
        ("supervisord.conf", Format::Supervisord),
        ("x.ini", Format::Supervisord),
        ("ecosystem.config.js", Format::Pm2Js),
        ("e.config.cjs", Format::Pm2Js),
        ("process.json", Format::Pm2Json),
        ("pm2.YAML", Format::Pm2Yaml),
        ("pm2.yml", Format::Pm2Yaml),
    ] {
        assert_eq!(Format::of(Path::new(name)), f, "{name}");
    }
}

#[test]
fn program_names_are_made_valid() {
    assert_eq!(program_name("web-1.a_b"), ("web-1.a_b".to_string(), false));
    assert_eq!(program_name("my app:x"), ("my-app-x".to_string(), true));
    assert_eq!(program_name("all"), ("all-".to_string(), true));
    assert_eq!(program_name(""), ("app".to_string(), true));
}

#[test]
fn lines_render_with_their_comments() {
    let mut doc = Doc::new();
    let mut t = Table::program("a.b");
    t.set("command", "x");
    t.set_noted("instances", 2, "numprocs");
    t.disabled("user", "bob", "not here");
    t.comment("a note");
    t.set("command", "y");
    doc.programs.push(t);
    let text = doc.render(Path::new("in.conf"));
    assert!(text.starts_with("# Imported from in.conf by `zdt import`."));
    assert!(
        text.ends_with(
            "[program.\"a.b\"]\ninstances = 2  # numprocs\n# user = \"bob\"  # not here\n# a note\ncommand = \"y\"\n"
        ),
        "{text}"
    );
    // No [supervisor] table when nothing went into it.
    assert!(!text.contains("[supervisor]"));
}

#[test]
fn the_planned_keys_are_dropped_for_the_check() {
    let text = "[program.a]\nmax_memory = \"1G\"\ncron_restart = \"0 4 * * *\"\ncommand = \"x\"\n\n[group.g]\nprograms = [\"a\"]\n\n[program.b]\ncommand = \"y\"\n";
    assert_eq!(
        without_planned(text),
        "[program.a]\ncommand = \"x\"\n\n[program.b]\ncommand = \"y\"\n"
    );
}
