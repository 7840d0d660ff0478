//! The daemon: binds the control socket, starts the supervisor, runs until
//! shutdown. `zdt -c FILE` is this plus argument parsing and logging.

use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::server::{self, PeerPolicy};
use crate::spawn::{Reaper, Spawner};
use crate::supervisor::{DaemonSignal, Supervisor};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] server::ControlError),
    /// The pid file could not be written.
    #[error("cannot write pidfile {path}: {source}")]
    Pidfile {
        /// Where.
        path: PathBuf,
        /// Why.
        source: crate::rundir::PathError,
    },
    /// `log_dir` is in a folder another user could change.
    #[error("log_dir: {0}")]
    LogDir(crate::rundir::PathError),
    /// The control group named in the config does not exist.
    #[error("control_group {0:?} does not exist")]
    NoSuchGroup(String),
    /// The admin listener could not be set up.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// What zdt's own service manager gave it (systemd: `Type=notify` and a
/// `.socket` unit); all empty when zdt runs otherwise.
#[derive(Debug, Default)]
pub struct Systemd {
    /// Where to send READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1.
    pub notifier: crate::sdnotify::Notifier,
    /// Listening sockets passed with LISTEN_FDS, used instead of binding
    /// the addresses they match.
    pub listen_fds: Vec<crate::activation::InheritedFd>,
}

/// Runs zdt with `config` until a shutdown arrives on `signals` (or through
/// the control socket) and every program has stopped.
pub async fn run(
    config: Config,
    spawner: Spawner,
    reaper: Reaper,
    signals: mpsc::Receiver<DaemonSignal>,
    systemd: Systemd,
    resumed: Option<(crate::upgrade::Carried, Option<String>)>,
) -> Result<(), DaemonError> {
    // After an upgrade (`resumed`: the state and, after a fallback, why the
    // upgrade failed): the previous binary's processes are registered with
    // the reaper before it first reaps.
    let mut resuming =
        resumed.map(|(carried, failed)| crate::upgrade::resume(carried, failed, &reaper));
    tokio::spawn(reaper.run());
    crate::fds::raise_limit();
    // Orphans of workers (double-forked helpers) become zdt's children, so
    // they are reaped here and not left to whatever init the machine has.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!(cause = %std::io::Error::last_os_error(), "cannot become a child subreaper");
    }
    let sup = &config.supervisor;
    // The previous binary's proxy process (an upgrade) serves until this
    // binary's own takes over.
    let old_proxy = resuming.as_mut().and_then(|r| r.proxy.take());
    let proxy = if sup.proxy_process {
        crate::proxy::Proxy::in_child(sup.proxy_threads, spawner.clone(), old_proxy)
    } else {
        if let Some(old) = old_proxy {
            tokio::spawn(old.retire(crate::proxy::RETIRE_DEADLINE));
        }
        crate::proxy::Proxy::new(sup.proxy_threads)
    };
    let group = match &sup.control_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| DaemonError::NoSuchGroup(name.clone()))?
                .gid,
        ),
        None => None,
    };
    // logs.rs creates log_dir when it first writes; it must not be (or be
    // under) a folder another user controls (see crate::rundir).
    crate::rundir::check_existing(&sup.log_dir).map_err(DaemonError::LogDir)?;
    let carried_control = resuming.as_mut().and_then(|r| r.control.take());
    let upgraded = resuming.is_some();
    let listener = match carried_control {
        Some(fd) => server::from_fd(fd, &sup.control)?,
        None => server::bind(&sup.control, sup.control_mode, group)?,
    };
    let control_fd = {
        use std::os::fd::AsRawFd;
        listener.as_raw_fd()
    };
    // The admin listener: carried across an upgrade when its address is
    // the same, so a load balancer's health check is never refused.
    let carried_admin = resuming.as_mut().and_then(|r| r.admin.take());
    let admin = match &sup.admin {
        None => None,
        Some(addr) => Some(match carried_admin {
            Some(fd) if same_address(&fd, addr) => crate::admin::Listener::from_fd(fd, addr)?,
            _ => crate::admin::bind(addr)?,
        }),
    };
    let carried_agent = resuming.as_mut().and_then(|r| r.agent.take());
    let agent = match sup.agent_check {
        None => None,
        Some(a) => {
            let addr = crate::config::ListenAddr::Tcp(a);
            let l = match carried_agent {
                Some(fd) if same_address(&fd, &addr) => crate::admin::Listener::from_fd(fd, &addr)?,
                _ => crate::admin::bind(&addr)?,
            };
            match l {
                crate::admin::Listener::Tcp(l) => Some(l),
                crate::admin::Listener::Unix(_) => None,
            }
        }
    };
    let groups_file = crate::orphans::state_path(&sup.control);
    if !upgraded {
        // The control socket is ours now, so no live zdt uses this state
        // file: kill what a zdt killed on this path left, before binding
        // its ports. (After an upgrade, those groups are our workers.)
        crate::orphans::sweep(&groups_file).await;
    }
    crate::orphans::start_recorder(groups_file);
    let control_path = sup.control.clone();
    let pidfile = sup.pidfile.clone();
    // After an upgrade the pid, and so the file, is the same.
    if let Some(path) = pidfile.as_ref().filter(|_| !upgraded) {
        // A new file (O_EXCL|O_NOFOLLOW) in a trusted folder: a link planted
        // at the path is removed, never written through.
        let pid = format!("{}\n", std::process::id());
        crate::rundir::write_new(path, pid.as_bytes(), 0o644).map_err(|source| {
            DaemonError::Pidfile {
                path: path.clone(),
                source,
            }
        })?;
    }
    tracing::info!(config = %config.file.display(), control = %control_path.display(), pid = std::process::id(), "zdt started");
    let (req_tx, req_rx) = mpsc::channel(64);
    let admin_tx = req_tx.clone();
    let stop_control = CancellationToken::new();
    let policy = PeerPolicy {
        own_uid: nix::unistd::geteuid().as_raw(),
        group,
    };
    let control = tokio::spawn(server::serve(
        listener,
        req_tx,
        policy,
        stop_control.clone(),
    ));
    let (inherited, unmatched) = crate::activation::assign(systemd.listen_fds, &config);
    if !unmatched.is_empty() {
        tracing::warn!(
            fds = %crate::activation::describe(&unmatched),
            "closing sockets passed by the service manager that match no program's listen address or fdname"
        );
        drop(unmatched);
    }
    let (registry, mut resumed) = match resuming {
        Some(r) => {
            let mut all_inherited = r.inherited;
            all_inherited.extend(inherited);
            (
                crate::listen::Registry::resumed(r.owned, all_inherited),
                r.supervisor,
            )
        }
        None => (
            crate::listen::Registry::with_inherited(inherited),
            crate::supervisor::Resumed::default(),
        ),
    };
    if let Some(rec) = &resumed.record {
        match &rec.error {
            None => {
                tracing::info!(from = %rec.from, to = %rec.to, ms = rec.ms, "upgraded in place")
            }
            Some(e) => {
                tracing::error!(error = %e, "the upgrade failed; this is the previous binary again")
            }
        }
    }
    resumed.control_fd = Some(control_fd);
    resumed.admin_fd = admin.as_ref().map(crate::admin::Listener::raw_fd);
    resumed.agent_fd = agent.as_ref().map(|l| {
        use std::os::fd::AsRawFd;
        l.as_raw_fd()
    });
    let supervisor = Supervisor::new(
        config,
        spawner,
        registry,
        systemd.notifier,
        proxy.clone(),
        resumed,
    );
    if admin.is_some() || agent.is_some() {
        let (host, programs, pause) = supervisor.admin_view();
        let view = crate::admin::Admin {
            requests: admin_tx,
            host,
            programs,
            proxy: proxy.clone(),
            pause,
        };
        if let Some(l) = agent {
            tokio::spawn(crate::admin::agent::serve(
                l,
                view.clone(),
                stop_control.clone(),
            ));
        }
        if let Some(l) = admin {
            tokio::spawn(crate::admin::serve(l, view, stop_control.clone()));
        }
    } else {
        drop(admin_tx);
    }
    supervisor.run(req_rx, signals).await;
    proxy.shutdown();
    crate::orphans::close().await;
    stop_control.cancel();
    let _ = control.await;
    let _ = std::fs::remove_file(&control_path);
    if let Some(path) = &pidfile {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("zdt stopped");
    Ok(())
}

/// Whether the carried socket `fd` listens on `addr` (the configuration
/// may have changed across the upgrade).
fn same_address(fd: &std::os::fd::OwnedFd, addr: &crate::config::ListenAddr) -> bool {
    use std::os::fd::AsRawFd;
    crate::activation::validate(fd.as_raw_fd()).is_ok_and(|a| a.as_ref() == Some(addr))
}
