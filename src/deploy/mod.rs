//! Deploys: releases in a root folder, build hooks, the atomic switch of
//! `current`, the zero-downtime restart of the programs on that root, and
//! going back when anything fails.
//!
//! ```text
//! zdtctl deploy ──► supervisor ──(task)──► deploy::run::deploy
//!                                            │ lock root (flock) + journal
//!                                            │ fetch: copy / unpack / git  → releases/.incoming-…
//!                                            │ rename → releases/<id>, shared links, build hooks
//!                                            │ [pause + migrate hooks]
//!                                            │ switch current (rename of a new link)
//!                                            │ restart every program on the root (ProgramMsg)
//!                                            │   failed → current back, programs back, release failed
//!                                            │ prune to keep_releases, unlock
//!                                            ▼ progress lines to zdtctl, the release's deploy log
//! ```
//!
//! Each process resolves `current` once when it is spawned (see
//! `program::slot`), so a generation that is still draining keeps its own
//! release. The deploy never touches a worker itself: it only asks the
//! program actors to restart, as `zdtctl restart` does.
//!
//! - [`layout`]: the folders of a root and each change made to them.
//! - [`fetch`]: filling a new release from a folder or an archive.
//! - [`hooks`]: running build hooks and git through zdt's spawner.
//! - [`run`]: the deploy and rollback sequences.
//! - [`watch`]: deploying by itself when a git branch or an upload folder changes.

pub mod fetch;
pub mod hooks;
pub mod layout;
pub mod run;
pub mod watch;

pub use layout::{Layout, Release};

use std::time::Duration;

/// A duration for humans: "310 ms", "14.2 s".
pub fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
