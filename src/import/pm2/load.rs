//! Reading PM2 process files: JSON (or JSON5, through node), YAML, and
//! `ecosystem.config.js` evaluated by `node -e`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;

use crate::import::{Format, ImportError, Source};

/// How long node may take to evaluate an ecosystem file.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// The value of the PM2 file at `path`, read as `format` says.
pub(super) fn read(path: &Path, format: Format) -> Result<Json, ImportError> {
    Ok(match format {
        Format::Pm2Js => evaluate_js(NODE, path)?,
        Format::Pm2Yaml => {
            let text = crate::import::supervisord::read(path, None)?;
            serde_yaml_ng::from_str::<Json>(&text).map_err(|e| {
                let at = match e.location() {
                    Some(l) => Source::at(path, l.line()),
                    None => Source::file(path),
                };
                ImportError::new(at, format!("not valid YAML: {e}"))
            })?
        }
        _ => {
            let text = crate::import::supervisord::read(path, None)?;
            match serde_json::from_str::<Json>(&text) {
                Ok(v) => v,
                // PM2 reads .json files as JSON5 (unquoted keys, single
                // quotes): node reads that as an object literal.
                Err(e) => evaluate_json5(path).map_err(|node| {
                    ImportError::new(
                        Source::at(path, e.line()),
                        format!("not valid JSON ({e}), nor JSON5 for node: {}", node.message),
                    )
                })?,
            }
        }
    })
}

/// The apps of a PM2 file's value.
pub(super) fn apps(v: &Json) -> Option<Vec<Json>> {
    match v {
        Json::Array(a) => Some(a.clone()),
        Json::Object(o) => match o.get("apps") {
            Some(Json::Array(a)) => Some(a.clone()),
            Some(app @ Json::Object(_)) => Some(vec![app.clone()]),
            None if o.contains_key("script") => Some(vec![v.clone()]),
            _ => None,
        },
        _ => None,
    }
}

/// `module.exports` of an ecosystem file, as JSON, from `node -e`.
pub(super) fn evaluate_js(node: &str, path: &Path) -> Result<Json, ImportError> {
    let at = Source::file(path);
    let abs = std::fs::canonicalize(path)
        .map_err(|e| ImportError::new(at.clone(), format!("cannot read it: {e}")))?;
    let file = serde_json::to_string(&abs.to_string_lossy()).unwrap_or_default();
    run_node(
        node,
        path,
        &abs,
        &format!(
            "const f = {file};\n\
         (async () => {{\n\
           let m;\n\
           try {{ m = require(f); }} catch (e) {{\n\
             if (e.code !== 'ERR_REQUIRE_ESM') throw e;\n\
             m = (await import(require('url').pathToFileURL(f))).default;\n\
           }}\n\
           process.stdout.write(JSON.stringify(m === undefined ? null : m));\n\
         }})().catch(e => {{ console.error(e && e.stack || String(e)); process.exit(1); }});"
        ),
    )
}

/// A PM2 .json file in JSON5, read by node as an object literal.
fn evaluate_json5(path: &Path) -> Result<Json, ImportError> {
    let at = Source::file(path);
    let abs = std::fs::canonicalize(path)
        .map_err(|e| ImportError::new(at.clone(), format!("cannot read it: {e}")))?;
    let file = serde_json::to_string(&abs.to_string_lossy()).unwrap_or_default();
    run_node(
        NODE,
        path,
        &abs,
        &format!(
            "const t = require('fs').readFileSync({file}, 'utf8');\n\
             const v = new Function('return (' + t + '\\n);')();\n\
             process.stdout.write(JSON.stringify(v === undefined ? null : v));"
        ),
    )
}

/// The program that evaluates ecosystem files (looked up in PATH).
const NODE: &str = "node";

/// Runs `script` with `node -e` in the folder of `abs` (the file `path`
/// names) and parses what it prints as JSON.
fn run_node(node: &str, path: &Path, abs: &Path, script: &str) -> Result<Json, ImportError> {
    let at = Source::file(path);
    let child = Command::new(node)
        .arg("-e")
        .arg(script)
        .current_dir(abs.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "node is not on PATH: it is needed to evaluate an ecosystem.config.js (or convert the file to JSON: node -e 'console.log(JSON.stringify(require(\"./ecosystem.config.js\")))' > ecosystem.json)".to_string()
            } else {
                format!("cannot run node: {e}")
            };
            ImportError::new(at.clone(), why)
        })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(NODE_TIMEOUT) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(ImportError::new(at, format!("node: {e}"))),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(ImportError::new(
                at,
                format!("node did not finish evaluating it within {NODE_TIMEOUT:?}"),
            ));
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // node names the file and line of a syntax error first.
        let line = err
            .lines()
            .next()
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(f, n)| {
                f.ends_with(&*abs.to_string_lossy())
                    .then(|| n.trim().parse().ok())?
            });
        let at = match line {
            Some(n) => Source::at(path, n),
            None => at,
        };
        return Err(ImportError::new(
            at,
            format!("node could not evaluate it:\n{}", err.trim_end()),
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| ImportError::new(at, format!("node printed no JSON: {e}")))
}
