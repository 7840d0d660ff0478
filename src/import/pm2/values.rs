//! PM2's value forms: times in milliseconds or with units, args as a
//! string or a list, the interpreter chosen by extension.

use std::path::Path;

use serde_json::Value as Json;

/// A PM2 time: a number of milliseconds, or a string such as "10s", "1m",
/// "500ms" (a bare string number is milliseconds too).
pub(super) fn millis(v: &Json) -> Option<u64> {
    match v {
        Json::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Json::String(s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<u64>() {
                return Some(n);
            }
            crate::config::parse_duration(s)
                .ok()
                .map(|d| d.as_millis() as u64)
        }
        _ => None,
    }
}

/// Milliseconds as a zdt duration.
pub(super) fn duration(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A JSON scalar as an environment value.
pub(super) fn env_value(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        Json::Bool(b) => Some(b.to_string()),
        Json::Null => Some(String::new()),
        _ => None,
    }
}

/// Words of a PM2 `args`/`interpreter_args`: a list, or a string split
/// like a shell would.
pub(super) fn words(v: &Json) -> Option<Vec<String>> {
    match v {
        Json::String(s) => shlex::split(s),
        Json::Array(a) => a.iter().map(env_value).collect(),
        _ => None,
    }
}

/// The interpreter PM2 picks from a script's extension.
pub(super) fn interpreter_for(script: &str) -> Option<&'static str> {
    let ext = Path::new(script).extension()?.to_str()?;
    Some(match ext {
        "js" | "cjs" | "mjs" => "node",
        "ts" => "ts-node",
        "coffee" => "coffee",
        "py" => "python3",
        "sh" => "bash",
        "rb" => "ruby",
        "php" => "php",
        "pl" => "perl",
        _ => return None,
    })
}

/// The number of CPUs here.
pub(super) fn cpus() -> i64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as i64)
}

/// `rel` under `base`, without `.` components.
pub(super) fn join(base: &Path, rel: &str) -> String {
    base.join(rel)
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect::<std::path::PathBuf>()
        .display()
        .to_string()
}
