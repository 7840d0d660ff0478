//! The old binary's half of an upgrade: check the new binary, freeze the
//! programs, let the proxy finish its connections, exec.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use super::state::{Carried, CarriedSocket, FORMAT};
use crate::control::proto::Reply;
use crate::program::{ProgramHandle, ProgramMsg};

/// What an upgrade needs of the supervisor.
pub struct HandOver<'a> {
    /// The new binary.
    pub binary: PathBuf,
    /// The client's token.
    pub token: String,
    /// When it was asked for (ms since the epoch).
    pub begun_ms: u64,
    /// The configuration zdt runs.
    pub config: &'a crate::config::Config,
    /// Every program, by name.
    pub programs: Vec<(String, ProgramHandle)>,
    /// Every listening socket.
    pub registry: &'a crate::listen::Registry,
    /// The listening control socket's fd.
    pub control_fd: std::os::fd::RawFd,
    /// Forks and execs.
    pub spawner: &'a crate::spawn::Spawner,
    /// zdt's service manager.
    pub notifier: &'a crate::sdnotify::Notifier,
    /// Progress lines for the client.
    pub progress: &'a mpsc::Sender<Reply>,
}

async fn say(progress: &mpsc::Sender<Reply>, message: String) {
    tracing::info!("upgrade: {message}");
    let _ = progress.send(Reply::Progress { message }).await;
}

/// Runs the upgrade; returns only if it did not happen, with why (the old
/// binary then serves on, unchanged).
pub async fn hand_over(h: HandOver<'_>) -> String {
    let binary = h.binary.display().to_string();
    let mut carried = Carried {
        format: FORMAT,
        from_version: env!("CARGO_PKG_VERSION").to_string(),
        token: h.token.clone(),
        begun_ms: h.begun_ms,
        config_file: h.config.file.clone(),
        config_text: h.config.text.clone(),
        control_fd: h.control_fd,
        sockets: Vec::new(),
        programs: Vec::new(),
    };
    // 1. The new binary must read this format and load this configuration.
    let checked = match super::write_state(&carried) {
        Ok(memfd) => super::precheck(h.spawner, &h.binary, &memfd).await,
        Err(e) => Err(format!("cannot write the state: {e}")),
    };
    match checked {
        Ok(version) => say(h.progress, format!("{binary}: {version}; it can take over")).await,
        Err(e) => return e,
    }
    // 2. Every program as it is; nothing changes from here to the exec.
    let mut thaws: Vec<oneshot::Sender<()>> = Vec::new();
    for (name, handle) in &h.programs {
        let (thaw_tx, thaw) = oneshot::channel();
        let frozen = handle
            .call(|reply| ProgramMsg::Freeze { reply, thaw })
            .await;
        match frozen {
            Some(Ok(p)) => {
                carried.programs.push(p);
                thaws.push(thaw_tx);
            }
            Some(Err(e)) => return format!("not now: {e}"),
            None => return format!("not now: {name} is stopping"),
        }
    }
    let processes: usize = carried
        .programs
        .iter()
        .flat_map(|p| &p.slots)
        .filter(|s| s.proc.is_some())
        .count();
    say(
        h.progress,
        format!(
            "{} program(s), {processes} process(es) handed over as they run",
            carried.programs.len()
        ),
    )
    .await;
    h.notifier.reloading();
    // 3. The sockets, by address.
    let sockets = h.registry.all();
    carried.sockets = sockets
        .iter()
        .map(|(addr, fd, inherited)| CarriedSocket {
            addr: addr.into(),
            fd: fd.as_raw_fd(),
            inherited: *inherited,
        })
        .collect();
    // 4. The exec, from the spawner thread.
    let memfd = match super::write_state(&carried) {
        Ok(f) => f,
        Err(e) => return format!("cannot write the state: {e}"),
    };
    let exec = match super::exec_for(&h.binary, &memfd, carried.fds()) {
        Ok(e) => e,
        Err(e) => return e,
    };
    say(h.progress, format!("executing {binary}")).await;
    let err = h.spawner.exec(exec).await;
    drop(thaws);
    h.notifier
        .ready("upgrade failed; the running binary serves on");
    format!("cannot execute {binary}: {err}")
}
