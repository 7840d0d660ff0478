//! The control socket: protocol types, the daemon's server and the client.
//!
//! Requests and replies are newline-delimited JSON on a unix stream socket
//! (see [`proto`]). The server forwards every well-formed request to the
//! supervisor as a [`ControlRequest`] and writes each [`proto::Reply`] it gets
//! back as one line, until the supervisor drops its sender.

pub mod client;
pub mod follow;
pub mod monitor;
pub mod proto;
pub mod server;

use tokio::sync::mpsc;

/// One request from a control client, on its way to the supervisor.
#[derive(Debug)]
pub struct ControlRequest {
    /// What the client asked for.
    pub command: proto::Command,
    /// Replies for the client. The supervisor (or the program actor it hands the
    /// request to) holds this end, sends zero or more progress/log replies and
    /// one final `Ok`/`Error`; dropping it ends the response to the client.
    pub replies: mpsc::Sender<proto::Reply>,
    /// The peer's uid, as checked with SO_PEERCRED.
    pub peer_uid: u32,
}
