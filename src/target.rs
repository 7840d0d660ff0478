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
/// counts). Results come in name order.
pub fn resolve<V>(target: &str, known: &BTreeMap<String, V>) -> Result<Vec<Resolved>, TargetError> {
    let list = || known.keys().cloned().collect::<Vec<_>>().join(", ");
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
