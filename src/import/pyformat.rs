//! supervisord's `%(name)s` expansions, and how each part is written for
//! zdt: `%(ENV_X)s` becomes zdt's own `${X}` (zdt's environment at load,
//! as supervisord's at start), `%(process_num)s` the instance number.

use std::collections::BTreeMap;

/// A piece of an expanded value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    /// Text as it is.
    Lit(String),
    /// `%(ENV_NAME)s`: a variable of the supervisor's environment.
    Env(String),
    /// `%(process_num)d`: the instance number, from `start`, zero-padded to
    /// `width` when `zero`.
    Num {
        /// numprocs_start.
        start: u32,
        /// Field width.
        width: usize,
        /// Pad with zeros.
        zero: bool,
    },
}

/// What expands: the names known for a section.
#[derive(Clone, Debug, Default)]
pub(crate) struct Names {
    /// program_name, group_name, here, host_node_name, numprocs.
    pub fixed: BTreeMap<&'static str, String>,
    /// numprocs_start: process_num is known only per instance.
    pub process_num_start: Option<u32>,
}

/// Expands `value`; an unknown name or a bad `%` is an error message.
pub(crate) fn expand(value: &str, names: &Names) -> Result<Vec<Seg>, String> {
    let mut out: Vec<Seg> = Vec::new();
    let mut lit = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let Some(r) = rest.strip_prefix('(') else {
            return Err(format!(
                "a lone '%' in {value:?}: write %% for a percent sign, or %(name)s"
            ));
        };
        let Some(close) = r.find(')') else {
            return Err(format!("unclosed %( in {value:?}"));
        };
        let name = &r[..close];
        let r = &r[close + 1..];
        // Flags and width, then the conversion letter.
        let spec_end = r
            .find(|c: char| !(c.is_ascii_digit() || "-#0 +.".contains(c)))
            .unwrap_or(r.len());
        let spec = &r[..spec_end];
        let Some(conv) = r[spec_end..].chars().next() else {
            return Err(format!(
                "%({name}) has no conversion (such as s or d) in {value:?}"
            ));
        };
        if !"sdirxXf".contains(conv) {
            return Err(format!(
                "%({name}){spec}{conv}: unknown conversion {conv:?}"
            ));
        }
        rest = &r[spec_end + conv.len_utf8()..];
        let zero = spec.starts_with('0');
        let width: usize = spec
            .trim_start_matches(['0', '-', '#', ' ', '+'])
            .parse()
            .unwrap_or(0);
        let pad = |s: String| -> String {
            if s.len() >= width {
                s
            } else if zero && conv != 's' {
                format!("{}{s}", "0".repeat(width - s.len()))
            } else if spec.contains('-') {
                format!("{s:<width$}")
            } else {
                format!("{s:>width$}")
            }
        };
        if let Some(var) = name.strip_prefix("ENV_") {
            if !lit.is_empty() {
                out.push(Seg::Lit(std::mem::take(&mut lit)));
            }
            out.push(Seg::Env(var.to_string()));
        } else if name == "process_num" {
            let Some(start) = names.process_num_start else {
                return Err(format!("%(process_num) cannot be used here ({value:?})"));
            };
            if !lit.is_empty() {
                out.push(Seg::Lit(std::mem::take(&mut lit)));
            }
            out.push(Seg::Num { start, width, zero });
        } else if let Some(v) = names.fixed.get(name) {
            lit.push_str(&pad(v.clone()));
        } else {
            let mut known: Vec<&str> = names.fixed.keys().copied().collect();
            if names.process_num_start.is_some() {
                known.push("process_num");
            }
            known.push("ENV_NAME");
            return Err(format!(
                "%({name}) cannot be expanded (known: {})",
                known.join(", ")
            ));
        }
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Seg::Lit(lit));
    }
    Ok(out)
}

/// Whether the instance number is in `segs`.
pub(crate) fn has_num(segs: &[Seg]) -> bool {
    segs.iter().any(|s| matches!(s, Seg::Num { .. }))
}

/// Escapes `${` for zdt, which expands `${VAR}` in every string.
pub(crate) fn escape(s: &str) -> String {
    s.replace("${", "$${")
}

/// A zdt string for `segs` without an instance number: literal text with
/// `${` escaped, `%(ENV_X)s` as `${X}`.
pub(crate) fn zdt_string(segs: &[Seg]) -> Option<String> {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Lit(l) => s.push_str(&escape(l)),
            Seg::Env(v) => s.push_str(&format!("${{{v}}}")),
            Seg::Num { .. } => return None,
        }
    }
    Some(s)
}

/// A zdt log file template: `%(process_num)s` counted from 0 without
/// padding is zdt's `{instance}`.
pub(crate) fn log_template(segs: &[Seg]) -> Option<String> {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Lit(l) => s.push_str(&escape(l)),
            Seg::Env(v) => s.push_str(&format!("${{{v}}}")),
            Seg::Num {
                start: 0,
                width: 0..=1,
                ..
            } => s.push_str("{instance}"),
            Seg::Num { .. } => return None,
        }
    }
    Some(s)
}

/// `text` quoted for sh (single quotes).
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The sh expression for an instance number.
fn sh_num(start: u32, width: usize, zero: bool) -> String {
    let n = if start == 0 {
        "$ZDT_INSTANCE".to_string()
    } else {
        format!("$((ZDT_INSTANCE + {start}))")
    };
    if width > 1 {
        let flag = if zero { "0" } else { "" };
        format!("\"$(printf '%{flag}{width}d' \"{n}\")\"")
    } else {
        format!("\"{n}\"")
    }
}

/// Private-use characters that mark a piece inside a command while it is
/// split.
const MARK: char = '\u{E000}';
const MARK_END: char = '\u{E001}';

/// A sh word for `segs`: literal text single-quoted, the instance number
/// and `%(ENV_X)s` (as zdt's `${X}`) spliced between.
fn sh_word(arg: &str, pieces: &[Seg]) -> String {
    let mut w = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find(MARK) {
        if i > 0 {
            w.push_str(&sh_quote(&rest[..i]));
        }
        let after = &rest[i + MARK.len_utf8()..];
        let end = after.find(MARK_END).unwrap_or(after.len());
        let idx: usize = after[..end].parse().unwrap_or(usize::MAX);
        match pieces.get(idx) {
            Some(Seg::Num { start, width, zero }) => w.push_str(&sh_num(*start, *width, *zero)),
            Some(Seg::Env(v)) => w.push_str(&format!("\"${{{v}}}\"")),
            _ => {}
        }
        rest = after.get(end + MARK_END.len_utf8()..).unwrap_or("");
    }
    if !rest.is_empty() || w.is_empty() {
        w.push_str(&sh_quote(rest));
    }
    escape_keeping_env(&w)
}

/// Escapes `${` in literal parts only: `"${X}"` pieces stay zdt's.
fn escape_keeping_env(w: &str) -> String {
    // Literal `${` can only appear inside single quotes, which `sh_quote`
    // wrote; the env pieces are `"${`.
    let mut out = String::new();
    let mut in_single = false;
    let mut chars = w.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            in_single = !in_single;
        }
        if c == '$' && in_single && chars.peek() == Some(&'{') {
            out.push_str("$$");
            continue;
        }
        out.push(c);
    }
    out
}

/// argv for a supervisord command that names `%(process_num)s` (or whose
/// environment does, `env`): `/bin/sh -c 'export ...; exec ARGV'`, so that
/// each instance gets its number from `$ZDT_INSTANCE`. The process after
/// exec is the command itself (same pid, same argv). None when the command
/// does not split (an unclosed quote).
pub(crate) fn sh_command(command: &[Seg], env: &[(String, Vec<Seg>)]) -> Option<Vec<String>> {
    let mut script = String::new();
    for (k, segs) in env {
        let words = marked(segs);
        script.push_str(&format!("export {k}={}; ", sh_word(&words, segs)));
    }
    let text = marked(command);
    let argv = shlex::split(&text)?;
    if argv.is_empty() {
        return None;
    }
    let words: Vec<String> = argv.iter().map(|a| sh_word(a, command)).collect();
    script.push_str("exec ");
    script.push_str(&words.join(" "));
    Some(vec!["/bin/sh".into(), "-c".into(), script])
}

/// `segs` as one string, each non-literal piece a marker with its index.
fn marked(segs: &[Seg]) -> String {
    segs.iter()
        .enumerate()
        .map(|(i, s)| match s {
            Seg::Lit(l) => l.clone(),
            _ => format!("{MARK}{i}{MARK_END}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        let mut fixed = BTreeMap::new();
        fixed.insert("program_name", "web".to_string());
        fixed.insert("here", "/etc/sv".to_string());
        fixed.insert("numprocs", "4".to_string());
        Names {
            fixed,
            process_num_start: Some(0),
        }
    }

    #[test]
    fn names_expand_and_env_becomes_zdts() {
        let s = expand(
            "%(here)s/%(program_name)s %(ENV_HOME)s 100%% ${x}",
            &names(),
        )
        .expect("ok");
        assert_eq!(
            zdt_string(&s).as_deref(),
            Some("/etc/sv/web ${HOME} 100% $${x}")
        );
        let s = expand("%(numprocs)03d", &names()).expect("ok");
        assert_eq!(zdt_string(&s).as_deref(), Some("004"));
    }

    #[test]
    fn unknown_names_and_lone_percents_are_errors() {
        assert!(expand("%(nope)s", &names())
            .expect_err("")
            .contains("known: here"));
        assert!(expand("50%", &names()).is_err());
        assert!(expand("%(here)", &names()).is_err());
        let mut n = names();
        n.process_num_start = None;
        assert!(expand("%(process_num)s", &n).is_err());
    }

    #[test]
    fn process_num_in_logs_is_instance() {
        let s = expand("/var/log/%(program_name)s-%(process_num)s.log", &names()).expect("ok");
        assert_eq!(
            log_template(&s).as_deref(),
            Some("/var/log/web-{instance}.log")
        );
        let s = expand("x-%(process_num)02d", &names()).expect("ok");
        assert_eq!(log_template(&s), None);
        assert_eq!(zdt_string(&s), None);
    }

    #[test]
    fn process_num_in_a_command_goes_through_sh() {
        let cmd = expand("/bin/sleep 10%(process_num)02d", &names()).expect("ok");
        let env = vec![(
            "N".to_string(),
            expand("n%(process_num)s ${y}", &names()).expect("ok"),
        )];
        let argv = sh_command(&cmd, &env).expect("splits");
        assert_eq!(
            argv,
            [
                "/bin/sh",
                "-c",
                "export N='n'\"$ZDT_INSTANCE\"' $${y}'; exec '/bin/sleep' '10'\"$(printf '%02d' \"$ZDT_INSTANCE\")\""
            ]
        );
        let mut n = names();
        n.process_num_start = Some(5);
        let cmd = expand("run --id=%(process_num)d '%(ENV_A)s b'", &n).expect("ok");
        let argv = sh_command(&cmd, &[]).expect("splits");
        assert_eq!(
            argv[2],
            "exec 'run' '--id='\"$((ZDT_INSTANCE + 5))\" \"${A}\"' b'"
        );
    }
}
