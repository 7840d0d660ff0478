//! zdt: a zero-downtime process supervisor for web servers.
//!
//! # Architecture
//!
//! Actors own their state; messages change it; observers read `watch`
//! snapshots. Nothing is shared behind a lock except the reaper's pid table
//! (and, in proxy mode, the proxy's table of counters per process, which
//! status reads).
//!
//! ```text
//!  zdtctl ──NDJSON──► control::server ──ControlRequest──► supervisor (root actor)
//!                     (task per client)                    │ owns config, programs map,
//!  signals::daemon_signals ──DaemonSignal (TERM, HUP)─────►│ listening sockets
//!                                                          │ ProgramMsg + oneshot reply
//!                                                          ▼
//!                                           program actor (one per program)
//!                                           │ slots: current / next / draining procs,
//!                                           │ pending ops, generation counter;
//!                                           │ publishes ProgramSnapshot (watch)
//!                                           ▼ ProcCmd            ▲ ProcEvent
//!                                         instance task (one per process)
//!                                           │ readiness (startsecs, notify socket,
//!                                           │ delay, exec probe), stop/kill timers
//!                                           ▼ SpawnSpec
//!  spawn::Spawner (zdt's main thread: fork + pre_exec + execve) ──pid──►
//!  spawn::Reaper  (SIGCHLD → waitpid(-1) → oneshot to the owning task; orphans reaped)
//! ```
//!
//! - [`config`]: supervisor.toml → [`config::Config`], validated whole, errors
//!   with file:line:col.
//! - [`control`]: the control protocol, its server and client.
//! - [`import`]: `zdt import`: a supervisord.conf or PM2 process file to a
//!   supervisor.toml, with a comment on each line whose meaning changed and
//!   a report of what has no equivalent. Runs nothing; reads the daemon's
//!   config loader only to ask whether a planned key is taken yet.
//! - [`supervisor`]: target resolution, fan-out by priority, reload diff,
//!   shutdown order, ownership of listening sockets ([`listen`]).
//! - [`program`]: orders (start, stop, stop-then-start restart, zero-downtime
//!   replace, reconfigure) as ops checked after every event; the instance state
//!   machine lives in `program::slot`.
//! - [`instance`]: one process: spawn, readiness, signals to its process group.
//! - [`spawn`]: the spawner (on the main thread) and the reaper; everything
//!   that allocates happens before fork.
//! - [`upgrade`]: `zdtctl upgrade` and SIGUSR2: the state carried across
//!   zdt's exec of its new binary, the check of that binary, the fallback.
//! - [`deploy`]: releases under a deploy root (fetch from a folder, an
//!   archive or git; build and migrate hooks; the atomic switch of
//!   `current`; switch back, rollback, canary, watches). A deploy runs in a
//!   task of the supervisor's and asks the program actors to restart; each
//!   process resolves its release once, at spawn.
//! - [`fds`]: the open-files limit, the fds kept for zdt itself, and what
//!   the proxy may use.
//! - [`logs`]: per-instance log files with rotation, the tail ring, followers;
//!   workers' pipes are read in batches, out of epoll while output gathers.
//! - [`rundir`]: the checks on every path zdt creates (private and trusted
//!   folders, files that never follow a planted link).
//! - [`state`]: instance states and the snapshots `status` prints.
//! - [`admin`]: the admin listener (`/health`, `/health/PROGRAM`,
//!   `/metrics`, `/status`) and the HAProxy agent port, read-only. Health
//!   is read from the programs' published snapshots (a program publishes
//!   its snapshot before its routes when it stops serving, so health turns
//!   before the proxy refuses); the supervisor publishes the program
//!   handles and the host's state (`admin::HostState`) on `watch`
//!   channels. [`metrics`] holds what accumulates between scrapes.
//! - [`sdnotify`] and [`activation`]: zdt under systemd: sd_notify to its
//!   own service manager (READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1, sent
//!   by the supervisor) and listening sockets passed to zdt itself
//!   (LISTEN_FDS), which the [`listen`] registry uses instead of binding.
//! - [`proxy`]: proxy mode, an owned `proxy::Proxy` the daemon creates,
//!   hands to the program actors and shuts down as it ends; by default it
//!   runs in `zdt __proxy`, a child process given the listening sockets and
//!   the routes over a channel (`proxy::remote`), restarted if it dies and
//!   left serving across an upgrade; `proxy_process = false` runs it in
//!   zdt's own process. A few current-thread runtimes (nginx's worker
//!   model) accepts on every proxied socket; a client connection, its requests
//!   and the upstream pools they use stay on one thread. The program actor
//!   publishes its routes as plain data (`proxy::RouteSet`; the proxy
//!   builds and owns the upstreams and their pools, and swaps them in with
//!   one `watch` send: the switch is atomic) and reads the counters back
//!   (`proxy::Counters`) into status and drains. Nothing on the data
//!   path waits on an actor (a pause holds requests on a `watch` of the
//!   program's gate, published with its routes). During a canary
//!   (`program::canary`) the routes carry two generations and a share; each
//!   request is assigned one by its cookie, a header hash or a draw
//!   (`proxy::canary`), and counted per generation. HTTP requests go through hyper (per-thread
//!   pools per upstream, request bodies that survive a failed connect,
//!   Upgrade tunnels); `protocol = "tcp"` copies, then splices, bytes.
//!
//! Shutdown order: TERM → supervisor stops programs by descending priority
//! (each level waits for the one before) → program actors stop their slots and
//! end → the control server stops → zdt exits. Every worker also dies with zdt
//! (PR_SET_PDEATHSIG, set when forked by the main thread, which lives as long
//! as zdt; the tokio runtime runs on threads of its own).
//!
//! Upgrade ([`upgrade`]): the supervisor freezes the program actors, the main
//! thread execs the new binary with the state in a memfd, and the new binary
//! adopts every process and socket under the same pid; the proxy process
//! serves throughout, and the new binary retires it once its own accepts.
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod activation;
pub mod admin;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deploy;
pub mod fds;
#[doc(hidden)]
pub mod fuzz;
pub mod import;
pub mod instance;
pub mod listen;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod orphans;
pub mod program;
pub mod proxy;
pub mod rundir;
pub mod sdnotify;
pub mod signals;
pub mod spawn;
pub mod state;
pub mod supervisor;
pub mod target;
pub mod upgrade;
