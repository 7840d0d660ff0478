//! Commands a deploy runs: build and migrate hooks, and git.
//!
//! They run through zdt's spawner like workers do (zdt reaps every child
//! with `waitpid(-1)`, so a `std::process` or tokio child would lose its
//! status to the reaper), in a process group of their own: a hook past its
//! timeout is SIGKILLed with everything it started, and so is whatever it
//! leaves behind when it exits.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::spawn::{ExitStatus, SpawnSpec, Spawner};

/// Lines of a hook's output kept for the error message.
pub const TAIL_LINES: usize = 20;

/// How long the output of a hook that exited is still read: a process it
/// left behind may hold the pipe open.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// One command to run.
#[derive(Clone, Debug)]
pub struct Hook {
    /// argv.
    pub argv: Vec<String>,
    /// Where it runs.
    pub dir: PathBuf,
    /// Variables added to zdt's environment.
    pub env: Vec<(String, String)>,
    /// Run as this user / group (zdt must be root).
    pub user: Option<String>,
    /// Group for `user`.
    pub group: Option<String>,
    /// It is killed after this long.
    pub timeout: Duration,
}

/// How a hook went.
#[derive(Debug)]
pub struct Ran {
    /// How it ended; None when it timed out (and was killed).
    pub status: Option<ExitStatus>,
    /// How long it ran.
    pub took: Duration,
    /// Its last lines of output (stdout and stderr together).
    pub tail: VecDeque<String>,
    /// Its whole stdout, up to 64 KiB, for commands whose answer is read
    /// (git rev-parse).
    pub output: String,
}

impl Ran {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.status == Some(ExitStatus::Code(0))
    }

    /// "exited with 1", "timed out after 10s".
    pub fn describe(&self, timeout: Duration) -> String {
        match self.status {
            Some(st) => format!("ended with {st}"),
            None => format!(
                "did not finish within build_timeout ({}); killed",
                crate::deploy::secs(timeout)
            ),
        }
    }

    /// The kept lines, joined.
    pub fn tail_text(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Runs `hook`; every output line goes to `line` as it comes.
pub async fn run(
    spawner: &Spawner,
    hook: &Hook,
    mut line: impl FnMut(&str),
) -> Result<Ran, String> {
    let spec = SpawnSpec {
        argv: hook.argv.clone(),
        env: hook.env.clone(),
        directory: Some(hook.dir.clone()),
        user: hook.user.clone(),
        group: hook.group.clone(),
        redirect_stderr: true,
        ..SpawnSpec::default()
    };
    let started = Instant::now();
    let spawned = spawner.spawn(spec).await.map_err(|e| e.to_string())?;
    let pgid = spawned.pid;
    let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(spawned.stdout)
        .map_err(|e| format!("cannot read its output: {e}"))?;
    let mut lines = BufReader::new(pipe).split(b'\n');
    let mut tail = VecDeque::new();
    let mut output = String::new();
    let mut take = |raw: Vec<u8>, tail: &mut VecDeque<String>, output: &mut String| {
        let text = String::from_utf8_lossy(&raw);
        let text = text.trim_end_matches('\r');
        line(text);
        if output.len() < 64 * 1024 {
            output.push_str(text);
            output.push('\n');
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text.to_string());
    };
    let mut exit = spawned.exit;
    let deadline = tokio::time::sleep(hook.timeout);
    tokio::pin!(deadline);
    let mut eof = false;
    let status = loop {
        tokio::select! {
            l = lines.next_segment(), if !eof => match l {
                Ok(Some(raw)) => take(raw, &mut tail, &mut output),
                _ => eof = true,
            },
            st = &mut exit => break st.ok(),
            () = &mut deadline => {
                let _ = killpg(pgid, Signal::SIGKILL);
                // The reaper reports the killed process promptly.
                let _ = (&mut exit).await;
                break None;
            }
        }
    };
    // What it left behind goes too (a build must not leave daemons).
    let _ = killpg(pgid, Signal::SIGKILL);
    let grace = tokio::time::sleep(OUTPUT_GRACE);
    tokio::pin!(grace);
    while !eof {
        tokio::select! {
            l = lines.next_segment() => match l {
                Ok(Some(raw)) => take(raw, &mut tail, &mut output),
                _ => eof = true,
            },
            () = &mut grace => break,
        }
    }
    Ok(Ran {
        status,
        took: started.elapsed(),
        tail,
        output,
    })
}
