//! zdt: a zero-downtime process supervisor for web servers.
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod config;
pub mod control;
pub mod state;
