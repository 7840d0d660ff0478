//! What zdt carries across its own exec: the state, written as JSON to a
//! memfd whose number the new binary finds in `ZDT_UPGRADE_STATE`.
//!
//! Every fd named here has had its close-on-exec flag cleared by the old
//! binary just before the exec; the new one takes each exactly once
//! ([`take_fd`]) and marks it close-on-exec again, so none reaches a worker.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ListenAddr;
use crate::state::InstanceState;

/// The newest format this binary writes and reads. A binary asked to read
/// another refuses, and the old binary keeps running.
///
/// 2 may carry a proxy process ([`Carried::proxy`]), which a binary that
/// reads only 1 would leave serving beside its own proxy: a state with a
/// proxy process is written as 2, any other as 1 (so an upgrade to a binary
/// of format 1 still works where no proxy process runs).
pub const FORMAT: u32 = 2;

/// The oldest format this binary reads.
pub const OLDEST_FORMAT: u32 = 1;

/// The format a state is written in: the oldest that can say what it
/// carries.
pub fn format_for(proxy_process: bool) -> u32 {
    if proxy_process {
        FORMAT
    } else {
        OLDEST_FORMAT
    }
}

/// zdt's state as the old binary hands it over.
#[derive(Debug, Serialize, Deserialize)]
pub struct Carried {
    /// [`FORMAT`] of the binary that wrote it.
    pub format: u32,
    /// The version of the binary that wrote it.
    pub from_version: String,
    /// Names this upgrade for `zdtctl upgrade`, which asks for its outcome
    /// by it once the new binary answers.
    pub token: String,
    /// When the upgrade was asked for (ms since the epoch).
    pub begun_ms: u64,
    /// The configuration the old binary runs (not the file as it is now:
    /// a changed file is applied by `zdtctl reload`, as always).
    pub config_file: PathBuf,
    /// Its text.
    pub config_text: String,
    /// The files its `include` named, with the text read from each.
    #[serde(default)]
    pub config_included: Vec<(PathBuf, String)>,
    /// The listening control socket.
    pub control_fd: RawFd,
    /// The admin listener (`[supervisor] admin`), if it runs.
    #[serde(default)]
    pub admin_fd: Option<RawFd>,
    /// The HAProxy agent port (`[supervisor] agent_check`), if it runs.
    #[serde(default)]
    pub agent_fd: Option<RawFd>,
    /// Every listening socket zdt owns.
    pub sockets: Vec<CarriedSocket>,
    /// Every program and its processes.
    pub programs: Vec<CarriedProgram>,
    /// The proxy process (`proxy_process`), serving on across the exec
    /// until the new binary's own proxy process takes over.
    #[serde(default)]
    pub proxy: Option<CarriedProxy>,
}

/// A proxy process left running for the next binary to retire.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedProxy {
    /// Its pid (a child of zdt).
    pub pid: u32,
    /// zdt's end of its channel.
    pub channel_fd: RawFd,
}

/// A listening socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedSocket {
    /// Its address.
    pub addr: CarriedAddr,
    /// The fd.
    pub fd: RawFd,
    /// It came from zdt's service manager (LISTEN_FDS), so it is never closed.
    pub inherited: bool,
}

/// A `listen` address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CarriedAddr {
    /// tcp://IP:PORT
    Tcp {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// unix:///path
    Unix {
        /// The path.
        path: PathBuf,
    },
}

impl From<&ListenAddr> for CarriedAddr {
    fn from(a: &ListenAddr) -> Self {
        match a {
            ListenAddr::Tcp(addr) => Self::Tcp { addr: *addr },
            ListenAddr::Unix(path) => Self::Unix { path: path.clone() },
        }
    }
}

impl From<CarriedAddr> for ListenAddr {
    fn from(a: CarriedAddr) -> Self {
        match a {
            CarriedAddr::Tcp { addr } => Self::Tcp(addr),
            CarriedAddr::Unix { path } => Self::Unix(path),
        }
    }
}

/// One program.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CarriedProgram {
    /// Its name.
    pub name: String,
    /// The newest generation started.
    pub generation: u64,
    /// `zdtctl drain` is in force.
    pub drained: bool,
    /// The deploy release of each recent generation: (generation, id, path).
    pub pins: Vec<(u64, String, PathBuf)>,
    /// Its instances.
    pub slots: Vec<CarriedSlot>,
}

/// One instance.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedSlot {
    /// Instance number.
    pub index: usize,
    /// RUNNING, STARTING (of a first start or a crash restart, not of a
    /// zero-downtime restart), STOPPED, EXITED, FATAL or BACKOFF.
    pub state: InstanceState,
    /// Since when it is in that state (ms since the epoch).
    #[serde(default)]
    pub since_ms: u64,
    /// How its last process ended.
    #[serde(default)]
    pub last_exit: Option<crate::state::ExitInfo>,
    /// The generation of its newest process.
    pub gen: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Failed starts in a row.
    pub failures: u32,
    /// Whether a process was ever started.
    pub started_once: bool,
    /// Why it is FATAL or backing off.
    pub error: Option<String>,
    /// The worker's last STATUS= text.
    #[serde(default)]
    pub status: Option<String>,
    /// Its process, when it runs.
    pub proc: Option<CarriedProc>,
}

/// A running worker process.
#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedProc {
    /// Its pid (and process group).
    pub pid: u32,
    /// Whether it was ready (else it was starting).
    #[serde(default = "yes")]
    pub ready: bool,
    /// Its generation.
    pub gen: u64,
    /// Proxy mode: its private TCP port.
    pub private_port: Option<u16>,
    /// Proxy mode with `upstream = "unix"`: its socket.
    pub socket_path: Option<PathBuf>,
    /// When it was spawned (ms since the epoch).
    pub started_ms: Option<u64>,
    /// Read end of its stdout pipe.
    pub stdout_fd: Option<RawFd>,
    /// Read end of its stderr pipe.
    pub stderr_fd: Option<RawFd>,
    /// Its NOTIFY_SOCKET (ready = notify).
    pub notify_fd: Option<RawFd>,
    /// The deploy release it runs in.
    pub release: Option<String>,
    /// In the new binary: its exit status and fds, taken at start.
    #[serde(skip)]
    pub adopted: Option<crate::instance::Adopted>,
}

fn yes() -> bool {
    true
}

/// Why a carried state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading the memfd failed.
    #[error("cannot read the carried state: {0}")]
    Read(std::io::Error),
    /// Not JSON this binary understands.
    #[error("cannot parse the carried state: {0}")]
    Parse(serde_json::Error),
    /// Written by a binary of another format.
    #[error(
        "the carried state has format {0}; this zdt reads formats {OLDEST_FORMAT} to {FORMAT}"
    )]
    Format(u32),
    /// The configuration it runs does not load in this binary.
    #[error("the running configuration does not load in this binary:\n{0}")]
    Config(String),
    /// Refused on purpose (`ZDT_UPGRADE_REFUSE`, for tests of the fallback).
    #[error("the carried state was refused (ZDT_UPGRADE_REFUSE is set)")]
    Refused,
}

impl Carried {
    /// Reads the state from `fd` (from its start, so that a fallback to the
    /// old binary can read it again), checking its format.
    pub fn read(fd: &std::fs::File) -> Result<Self, StateError> {
        use std::os::unix::fs::FileExt;
        let mut bytes = Vec::new();
        let mut at = 0u64;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = fd.read_at(&mut chunk, at).map_err(StateError::Read)?;
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
            at += n as u64;
        }
        Self::parse(&bytes)
    }

    /// Reads the state from `fd` and loads the configuration it runs: what
    /// a binary must manage to take over (its check does exactly this).
    pub fn read_running(fd: &std::fs::File) -> Result<(Self, crate::config::Config), StateError> {
        let carried = Self::read(fd)?;
        let mut config = crate::config::parse_carried(
            &carried.config_text,
            &carried.config_file,
            &carried.config_included,
        )
        .map_err(|e| StateError::Config(e.render()))?;
        // A program scaled by `zdtctl scale` runs another count than its
        // file says: the count it runs with goes on.
        for p in &carried.programs {
            if let Some(cfg) = config.programs.get_mut(&p.name) {
                match u32::try_from(p.slots.len()) {
                    Ok(n) if n > 0 => cfg.instances = n,
                    _ => {}
                }
            }
        }
        Ok((carried, config))
    }

    /// Parses and checks the state.
    pub fn parse(bytes: &[u8]) -> Result<Self, StateError> {
        // The format first, so that a newer state says what it is even when
        // the rest of it does not parse here.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(StateError::Parse)?;
        if !(OLDEST_FORMAT..=FORMAT).contains(&head.format) {
            return Err(StateError::Format(head.format));
        }
        serde_json::from_slice(bytes).map_err(StateError::Parse)
    }

    /// Every fd the state names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.control_fd];
        fds.extend(self.admin_fd);
        fds.extend(self.agent_fd);
        fds.extend(self.sockets.iter().map(|s| s.fd));
        fds.extend(self.proxy.as_ref().map(|p| p.channel_fd));
        for p in &self.programs {
            for s in &p.slots {
                if let Some(pr) = &s.proc {
                    fds.extend(
                        [pr.stdout_fd, pr.stderr_fd, pr.notify_fd]
                            .into_iter()
                            .flatten(),
                    );
                }
            }
        }
        fds
    }
}

/// Takes ownership of a carried fd, marking it close-on-exec again; None
/// when it is not open (the state is then wrong about it).
pub fn take_fd(fd: RawFd) -> Option<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    // SAFETY: the fd is open (fcntl succeeded) and named by the carried
    // state, which gives each fd to exactly one owner; nothing else in this
    // process took it (the daemon takes the state once, at start).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_format_is_refused_by_its_number() {
        let err = Carried::parse(br#"{"format": 99, "whatever": true}"#).expect_err("format 99");
        assert!(matches!(err, StateError::Format(99)), "{err}");
        assert!(matches!(
            Carried::parse(b"not json"),
            Err(StateError::Parse(_))
        ));
    }

    #[test]
    fn formats_1_and_2_are_read_and_a_newer_one_is_refused() {
        assert_eq!((format_for(false), format_for(true)), (1, 2));
        for format in [1, 2] {
            let text = format!(
                r#"{{"format":{format},"from_version":"1","token":"t","begun_ms":1,"config_file":"/x","config_text":"","control_fd":3,"sockets":[],"programs":[]}}"#
            );
            let c = Carried::parse(text.as_bytes()).expect("readable");
            assert!(c.proxy.is_none());
        }
        let newer = br#"{"format":3,"anything":true}"#;
        assert!(matches!(Carried::parse(newer), Err(StateError::Format(3))));
    }

    #[test]
    fn a_state_round_trips() {
        let c = Carried {
            format: FORMAT,
            from_version: "1".into(),
            token: "t".into(),
            begun_ms: 5,
            config_file: "/x/supervisor.toml".into(),
            config_included: Vec::new(),
            config_text: "[supervisor]\n".into(),
            control_fd: 7,
            admin_fd: Some(12),
            agent_fd: Some(13),
            sockets: vec![CarriedSocket {
                addr: CarriedAddr::Tcp {
                    addr: "127.0.0.1:80".parse().expect("addr"),
                },
                fd: 8,
                inherited: false,
            }],
            programs: vec![CarriedProgram {
                name: "web".into(),
                generation: 3,
                slots: vec![CarriedSlot {
                    index: 0,
                    state: InstanceState::Running,
                    since_ms: 0,
                    last_exit: None,
                    gen: 3,
                    restarts: 2,
                    failures: 0,
                    started_once: true,
                    error: None,
                    status: None,
                    proc: Some(CarriedProc {
                        pid: 42,
                        ready: true,
                        gen: 3,
                        private_port: Some(4000),
                        socket_path: None,
                        started_ms: Some(1),
                        stdout_fd: Some(9),
                        stderr_fd: None,
                        notify_fd: Some(10),
                        release: None,
                        adopted: None,
                    }),
                }],
                ..CarriedProgram::default()
            }],
            proxy: Some(CarriedProxy {
                pid: 43,
                channel_fd: 11,
            }),
        };
        let bytes = serde_json::to_vec(&c).expect("json");
        let back = Carried::parse(&bytes).expect("parse");
        assert_eq!(back.fds(), vec![7, 12, 13, 8, 11, 9, 10]);
        assert_eq!(back.proxy.as_ref().map(|p| p.pid), Some(43));
        assert_eq!(
            back.programs[0].slots[0].proc.as_ref().map(|p| p.pid),
            Some(42)
        );
    }
}
