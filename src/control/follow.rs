//! `zdtctl logs` and `zdtctl tail NAME` of a program with several
//! instances: the output of several instances and streams, each line
//! prefixed with where it came from (like `pm2 logs`), over one control
//! connection per stream.

use std::path::Path;

use super::client::{Client, ClientError};
use super::proto::{Command, ErrorBody, Outcome, Reply};

/// One output stream to follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// The program.
    pub program: String,
    /// Its instance.
    pub instance: u32,
    /// stderr rather than stdout.
    pub stderr: bool,
}

impl Stream {
    fn label(&self) -> String {
        let err = if self.stderr { " err" } else { "" };
        format!("{}:{}{err}", self.program, self.instance)
    }
}

/// Colours for program labels, in turn (ANSI: cyan, green, yellow,
/// magenta, blue, bright cyan); stderr labels are red.
const COLOURS: [&str; 6] = ["36", "32", "33", "35", "34", "96"];
const RED: &str = "31";

/// Splits chunks of output into lines and puts `prefix` before each; a
/// line cut between chunks waits for its end.
#[derive(Debug)]
pub struct Prefixer {
    prefix: String,
    partial: String,
}

impl Prefixer {
    /// Lines will start with `prefix`.
    pub fn new(prefix: String) -> Self {
        Self {
            prefix,
            partial: String::new(),
        }
    }

    /// The complete lines `data` ends, each with the prefix.
    pub fn feed(&mut self, data: &str) -> String {
        self.partial.push_str(data);
        let Some(end) = self.partial.rfind('\n') else {
            return String::new();
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        done.lines()
            .map(|l| format!("{}{l}\n", self.prefix))
            .collect()
    }

    /// What is left: a last line without its newline.
    pub fn finish(&mut self) -> String {
        if self.partial.is_empty() {
            return String::new();
        }
        let line = std::mem::take(&mut self.partial);
        format!("{}{line}\n", self.prefix)
    }
}

/// The prefix of each stream's lines: its label padded to the longest,
/// coloured by program when `colour`.
pub fn prefixes(streams: &[Stream], colour: bool) -> Vec<String> {
    let width = streams
        .iter()
        .map(|s| s.label().chars().count())
        .max()
        .unwrap_or(0);
    let mut programs: Vec<&str> = streams.iter().map(|s| s.program.as_str()).collect();
    programs.dedup();
    streams
        .iter()
        .map(|s| {
            let label = format!("{:width$}", s.label());
            if !colour {
                return format!("{label} | ");
            }
            let code = if s.stderr {
                RED
            } else {
                let i = programs.iter().position(|p| *p == s.program).unwrap_or(0);
                COLOURS[i % COLOURS.len()]
            };
            format!("\x1b[{code}m{label}\x1b[0m | ")
        })
        .collect()
}

/// The instances of the programs `target` names, from zdt's status.
pub async fn instances(
    socket: &Path,
    target: Option<String>,
) -> Result<Result<Vec<(String, u32)>, ErrorBody>, ClientError> {
    let mut client = Client::connect(socket).await?;
    let outcome = client.request(Command::Status { target }, |_| {}).await?;
    Ok(outcome.map(|o| match o {
        Outcome::Status { programs } => {
            let mut out: Vec<(String, u32)> = programs
                .iter()
                .flat_map(|p| p.instances.iter().map(|i| (p.name.clone(), i.instance)))
                .collect();
            out.sort();
            out.dedup();
            out
        }
        _ => Vec::new(),
    }))
}

/// The most streams one `zdtctl logs` follows: each is a control
/// connection, and zdt serves 256 at once; the rest stay free for
/// commands (a restart, a drain) while logs are followed.
pub const MAX_STREAMS: usize = 64;

/// Why following stopped.
enum Failure {
    Refused(ErrorBody),
    Client(ClientError),
}

/// Follows (or, without `follow`, prints the last `lines` of) each stream,
/// calling `print` with whole prefixed lines as they come; without
/// `follow`, stream after stream, in the order given. Returns when every
/// stream has ended, or at the first error.
pub async fn follow(
    socket: &Path,
    streams: &[Stream],
    lines: usize,
    follow: bool,
    colour: bool,
    print: &dyn Fn(&str),
) -> Result<Result<(), ErrorBody>, ClientError> {
    if streams.len() > MAX_STREAMS {
        return Ok(Err(ErrorBody::new(
            "bad_request",
            format!(
                "{} streams (instances × stdout/stderr) is more than {MAX_STREAMS}: name fewer programs, or use --out or --err",
                streams.len()
            ),
        )));
    }
    let prefixes = prefixes(streams, colour);
    let runs = streams.iter().zip(prefixes).map(|(s, prefix)| async move {
        let mut client = Client::connect(socket).await.map_err(Failure::Client)?;
        let mut lines_out = Prefixer::new(prefix);
        let command = Command::Tail {
            target: format!("{}:{}", s.program, s.instance),
            stderr: s.stderr,
            follow,
            bytes: None,
            lines: Some(lines),
        };
        let result = client
            .request(command, |reply| {
                if let Reply::Log { data } = reply {
                    print(&lines_out.feed(data));
                }
            })
            .await;
        // Without follow the history is the answer: kept for its turn.
        let mut kept = String::new();
        match result {
            Ok(Ok(Outcome::Tail { data })) => kept = lines_out.feed(&data),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Failure::Refused(e)),
            Err(e) => return Err(Failure::Client(e)),
        }
        kept.push_str(&lines_out.finish());
        Ok(kept)
    });
    // The first stream that fails ends them all: a log that is half
    // followed must not pass for the whole.
    match futures_util::future::try_join_all(runs).await {
        Ok(kept) => {
            for k in kept {
                print(&k);
            }
            Ok(Ok(()))
        }
        Err(Failure::Refused(e)) => Ok(Err(e)),
        Err(Failure::Client(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_cut_between_chunks_are_prefixed_once_whole() {
        let mut p = Prefixer::new("web:0 | ".into());
        assert_eq!(p.feed("one\ntw"), "web:0 | one\n");
        assert_eq!(p.feed("o\nthree"), "web:0 | two\n");
        assert_eq!(p.feed(""), "");
        assert_eq!(p.finish(), "web:0 | three\n");
        assert_eq!(p.finish(), "");
    }

    #[tokio::test]
    async fn more_streams_than_the_cap_are_refused_before_any_connection() {
        let streams: Vec<Stream> = (0..=MAX_STREAMS as u32)
            .map(|i| Stream {
                program: "web".into(),
                instance: i,
                stderr: false,
            })
            .collect();
        let printed = std::cell::Cell::new(0);
        let r = follow(
            Path::new("/nonexistent/zdt.sock"),
            &streams,
            10,
            true,
            false,
            &|_| printed.set(printed.get() + 1),
        )
        .await;
        match r {
            Ok(Err(e)) => assert!(e.message.contains("more than 64"), "{}", e.message),
            other => panic!("{:?}", other.map(|r| r.map_err(|e| e.message))),
        }
        assert_eq!(printed.get(), 0);
    }

    #[test]
    fn labels_are_padded_and_coloured_by_program() {
        let s = |program: &str, instance, stderr| Stream {
            program: program.into(),
            instance,
            stderr,
        };
        let streams = [s("web", 0, false), s("web", 10, true), s("queue", 0, false)];
        assert_eq!(
            prefixes(&streams, false),
            ["web:0      | ", "web:10 err | ", "queue:0    | "]
        );
        let c = prefixes(&streams, true);
        assert!(c[0].starts_with("\x1b[36mweb:0"), "{c:?}");
        assert!(c[1].starts_with("\x1b[31mweb:10 err"), "{c:?}");
        assert!(c[2].starts_with("\x1b[32mqueue:0"), "{c:?}");
    }
}
