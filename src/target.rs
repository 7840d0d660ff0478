//! Resolving a `zdtctl` target (`web1`, `web1:0`, `web*`, `web1:*`, `all`) to
//! programs and instances.

use std::collections::BTreeMap;

/// One resolved target: a program and optionally one of its instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Program name.
    pub program: String,
    /// One instance, or None for all.
    pub instance: Option<u32>,
}

/// Why a target matched nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    /// For the operator.
    pub message: String,
}

/// Matches `pattern` (with `*` and `?`) against `name`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Resolves `target` against the known program names (with their instance
/// counts) and the configured groups. Results come in name order.
///
/// A group's name (`web`, `web:*`) stands for its programs; `GROUP:PROGRAM`
/// names one of them, as in supervisorctl.
pub fn resolve<V>(
    target: &str,
    known: &BTreeMap<String, V>,
    groups: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<Resolved>, TargetError> {
    let list = || known.keys().cloned().collect::<Vec<_>>().join(", ");
    let group = target.split_once(':').map_or(target, |(g, _)| g);
    if let Some(members) = groups.get(group) {
        let chosen: Vec<&String> = match target.split_once(':') {
            None | Some((_, "*")) | Some((_, "")) => members.iter().collect(),
            Some((_, p)) => match members.iter().find(|m| *m == p) {
                Some(m) => vec![m],
                None => {
                    return Err(TargetError {
                        message: format!(
                            "group {group:?} has no program {p:?} (its programs: {})",
                            members.join(", ")
                        ),
                    })
                }
            },
        };
        let mut out: Vec<Resolved> = chosen
            .into_iter()
            .filter(|m| known.contains_key(*m))
            .map(|m| Resolved {
                program: m.clone(),
                instance: None,
            })
            .collect();
        out.sort_by(|a, b| a.program.cmp(&b.program));
        return Ok(out);
    }
    let (name, instance) = match target.split_once(':') {
        Some((n, "*")) | Some((n, "")) => (n, None),
        Some((n, i)) => match i.parse::<u32>() {
            Ok(i) => (n, Some(i)),
            Err(_) => {
                return Err(TargetError {
                    message: format!(
                        "bad instance {i:?} in {target:?}: use NAME:NUMBER, e.g. {n}:0, or NAME:* for all"
                    ),
                })
            }
        },
        None => (target, None),
    };
    let matched: Vec<Resolved> = known
        .keys()
        .filter(|k| name == "all" || glob_match(name, k))
        .map(|k| Resolved {
            program: k.clone(),
            instance,
        })
        .collect();
    if matched.is_empty() {
        let known_list = if known.is_empty() {
            "none configured".to_string()
        } else {
            list()
        };
        return Err(TargetError {
            message: format!("unknown program {name:?} (known: {known_list})"),
        });
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve<V>(t: &str, k: &BTreeMap<String, V>) -> Result<Vec<Resolved>, TargetError> {
        super::resolve(t, k, &BTreeMap::new())
    }

    #[test]
    fn a_group_stands_for_its_programs() {
        let k = known();
        let groups = BTreeMap::from([("site".to_string(), vec!["web2".into(), "worker".into()])]);
        let names = |t: &str| -> Vec<String> {
            super::resolve(t, &k, &groups)
                .expect("resolves")
                .into_iter()
                .map(|r| r.program)
                .collect()
        };
        assert_eq!(names("site"), ["web2", "worker"]);
        assert_eq!(names("site:*"), ["web2", "worker"]);
        assert_eq!(names("site:worker"), ["worker"]);
        let err = super::resolve("site:web1", &k, &groups).expect_err("not a member");
        assert!(
            err.message.contains("has no program \"web1\""),
            "{}",
            err.message
        );
        // Program targets are unchanged.
        assert_eq!(names("web1:*"), ["web1"]);
        assert_eq!(
            super::resolve("web1:1", &k, &groups).expect("instance")[0].instance,
            Some(1)
        );
    }

    fn known() -> BTreeMap<String, ()> {
        ["web1", "web2", "worker"]
            .iter()
            .map(|s| (s.to_string(), ()))
            .collect()
    }

    #[test]
    fn globs() {
        assert!(glob_match("web*", "web1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("w?b1", "web1"));
        assert!(glob_match("*er", "worker"));
        assert!(!glob_match("web", "web1"));
        assert!(!glob_match("web?", "web"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
    }

    #[test]
    fn resolves_names_instances_and_globs() {
        let k = known();
        let r = resolve("web1:1", &k).expect("resolves");
        assert_eq!(
            r,
            vec![Resolved {
                program: "web1".into(),
                instance: Some(1)
            }]
        );
        assert_eq!(resolve("web*", &k).expect("glob").len(), 2);
        assert_eq!(resolve("all", &k).expect("all").len(), 3);
        assert_eq!(resolve("web2:*", &k).expect("star")[0].instance, None);
        let err = resolve("web3", &k).expect_err("unknown");
        assert_eq!(
            err.message,
            "unknown program \"web3\" (known: web1, web2, worker)"
        );
        assert!(resolve("web1:x", &k).is_err());
    }
}
