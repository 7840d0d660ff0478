//! zdt: a zero-downtime process supervisor for web servers.
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod config;
pub mod control;
pub mod daemon;
pub mod instance;
pub mod listen;
pub mod logs;
pub mod notify;
pub mod program;
pub mod signals;
pub mod spawn;
pub mod state;
pub mod supervisor;
pub mod target;
