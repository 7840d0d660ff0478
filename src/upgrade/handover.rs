//! The old binary's half of an upgrade: check the new binary, freeze the
//! programs, let the proxy finish its connections, exec.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use super::state::{format_for, Carried, CarriedProxy, CarriedSocket};
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
    /// The admin listener's fd, if it runs.
    pub admin_fd: Option<std::os::fd::RawFd>,
    /// The HAProxy agent port's fd, if it runs.
    pub agent_fd: Option<std::os::fd::RawFd>,
    /// Stops the admin listener's accepting before the exec.
    pub admin_pause: &'a crate::admin::Pause,
    /// Forks and execs.
    pub spawner: &'a crate::spawn::Spawner,
    /// The proxy component, whose client connections cannot cross the exec.
    pub proxy: &'a crate::proxy::Proxy,
    /// zdt's service manager.
    pub notifier: &'a crate::sdnotify::Notifier,
    /// Progress lines for the client.
    pub progress: &'a mpsc::Sender<Reply>,
}

/// How long a kept-alive client connection with no request in progress
/// is given to send one before an upgrade closes it: a client that has its
/// next request on the way gets it answered (with `Connection: close`).
const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// How long the exec waits for the admin listener's open connections to be
/// answered (each answer closes its connection).
const ADMIN_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// How long the exec waits for the progress lines to reach the client.
const PROGRESS_FLUSH: std::time::Duration = std::time::Duration::from_millis(100);

async fn say(progress: &mpsc::Sender<Reply>, message: String) {
    tracing::info!("upgrade: {message}");
    let _ = progress.send(Reply::Progress { message }).await;
}

/// Runs the upgrade; returns only if it did not happen, with why (the old
/// binary then serves on, unchanged).
pub async fn hand_over(h: HandOver<'_>) -> String {
    let binary = h.binary.display().to_string();
    let mut carried = Carried {
        format: format_for(h.proxy.remote().is_some()),
        from_version: env!("CARGO_PKG_VERSION").to_string(),
        token: h.token.clone(),
        begun_ms: h.begun_ms,
        config_file: h.config.file.clone(),
        config_text: h.config.text.clone(),
        config_included: h.config.included.clone(),
        control_fd: h.control_fd,
        admin_fd: h.admin_fd,
        agent_fd: h.agent_fd,
        sockets: Vec::new(),
        programs: Vec::new(),
        proxy: None,
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
    // 3. Proxy mode: no new connections (they wait in the backlog); each
    // open one closes after the answer it is in, an idle one after the grace.
    let proxied: Vec<&crate::config::ProgramConfig> = h
        .config
        .programs
        .values()
        .filter(|p| p.mode == crate::config::Mode::Proxy)
        .collect();
    // A proxy process (`proxy_process`) goes on serving across the exec:
    // the new binary retires it once its own proxy process accepts.
    let in_process = h.proxy.local();
    let retired = match (in_process, proxied.iter().map(|p| p.max_wait).max()) {
        (Some(proxy), Some(deadline)) => {
            let r = proxy.retire(RETIRE_GRACE, deadline).await;
            say(
                h.progress,
                format!(
                    "proxy: client connections closed in {} ms{}",
                    r.took.as_millis(),
                    if r.still_open > 0 {
                        format!("; {} still open at max_wait are cut", r.still_open)
                    } else {
                        String::new()
                    }
                ),
            )
            .await;
            Some(r)
        }
        _ => None,
    };
    // 4. The sockets, by address.
    let sockets = h.registry.all();
    carried.sockets = sockets
        .iter()
        .map(|(addr, fd, inherited)| CarriedSocket {
            addr: addr.into(),
            fd: fd.as_raw_fd(),
            inherited: *inherited,
        })
        .collect();
    // The proxy process serves on; the new binary retires it.
    // Held until the exec: the number the state names stays this channel.
    let proxy_channel = h.proxy.remote().and_then(|c| c.carry());
    carried.proxy = proxy_channel.as_ref().map(|(pid, fd)| CarriedProxy {
        pid: *pid,
        channel_fd: fd.as_raw_fd(),
    });
    if let Some(p) = &carried.proxy {
        say(
            h.progress,
            format!(
                "proxy process {} serves on; the new binary retires it once its own accepts",
                p.pid
            ),
        )
        .await;
    }
    // 5. The admin listener stops accepting (health checks wait in its
    // backlog for the new binary) and answers what it has.
    let admin_paused = h.admin_pause.pause(ADMIN_QUIET).await;
    // 6. The exec, from the spawner thread.
    let memfd = match super::write_state(&carried) {
        Ok(f) => f,
        Err(e) => return format!("cannot write the state: {e}"),
    };
    let exec = match super::exec_for(&h.binary, &memfd, carried.fds()) {
        Ok(e) => e,
        Err(e) => return e,
    };
    say(h.progress, format!("executing {binary}")).await;
    // The exec ends the client's connection task: let it take every
    // progress line first (the channel is empty once all permits are free).
    let _ = tokio::time::timeout(
        PROGRESS_FLUSH,
        h.progress.reserve_many(h.progress.max_capacity()),
    )
    .await;
    let err = h.spawner.exec(exec).await;
    // Still here: accept and keep alive again, and let the programs go on.
    drop(admin_paused);
    drop(proxy_channel);
    drop(retired);
    drop(thaws);
    h.notifier
        .ready("upgrade failed; the running binary serves on");
    format!("cannot execute {binary}: {err}")
}
