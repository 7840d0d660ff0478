//! Pending orders of a program actor and when they are done.
//!
//! An order (start, stop, restart) is accepted at once and finished later:
//! the actor re-checks every pending [`Op`] after each change of its slots and
//! answers it as soon as [`verdict`] says it succeeded or failed.

use tokio::sync::{mpsc, oneshot};

use crate::config::ProgramConfig;
use crate::control::proto::Reply;
use crate::state::InstanceState;

use super::OpResult;

/// What an order waits for.
#[derive(Debug)]
pub(super) enum OpKind {
    /// Every slot RUNNING.
    Start,
    /// Every slot without a process.
    Stop,
    /// A change of `instances` with nothing else stopped: `slots` are the
    /// instances added (done when RUNNING) or removed (done when they have
    /// no process; the actor then drops them).
    Scale { grow: bool },
    /// First every slot without a process (`starting` false), then every slot
    /// RUNNING in the new generation, with `new_config` applied in between.
    Restart {
        starting: bool,
        new_config: Option<Box<ProgramConfig>>,
        instance: Option<u32>,
    },
    /// Zero-downtime restart: generation `gen` starts beside the running one;
    /// `todo` are the slots not yet switched (all together, or one at a time
    /// when `rolling`); done when every slot switched and its old generation
    /// exited.
    Replace {
        gen: u64,
        rolling: bool,
        todo: Vec<usize>,
        started: std::time::Instant,
        /// When traffic last moved to the new generation (the drain of the
        /// old one runs from there).
        switched: Option<std::time::Instant>,
        /// A reload's replace: the settings and sockets in force before it,
        /// put back if no instance switched when it fails.
        previous: Option<Box<Previous>>,
        /// A canary: once every candidate is ready, it serves this
        /// percentage of new clients beside the old generation (no switch)
        /// and the order is done.
        canary: Option<u8>,
    },
}

/// What a program ran with before a reload's replace.
#[derive(Debug)]
pub(super) struct Previous {
    pub config: ProgramConfig,
    pub sockets: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// One pending order.
#[derive(Debug)]
pub(super) struct Op {
    pub kind: OpKind,
    /// The slots it concerns.
    pub slots: Vec<usize>,
    /// The client waits on the other end; dropping it tells the client the
    /// order was abandoned.
    reply: oneshot::Sender<OpResult>,
    /// Progress lines for the client, if it asked for them.
    progress: Option<mpsc::Sender<Reply>>,
}

impl Op {
    pub fn new(
        kind: OpKind,
        slots: Vec<usize>,
        reply: oneshot::Sender<OpResult>,
        progress: Option<mpsc::Sender<Reply>>,
    ) -> Self {
        Self {
            kind,
            slots,
            reply,
            progress,
        }
    }

    /// Sends a progress line; never waits (a slow client loses lines).
    pub fn progress(&self, message: String) {
        if let Some(tx) = &self.progress {
            let _ = tx.try_send(Reply::Progress { message });
        }
    }

    pub fn finish(self, result: OpResult) {
        // The client may have gone away; the order was carried out anyway.
        let _ = self.reply.send(result);
    }

    /// Whether this order concerns any of `slots`.
    pub fn overlaps(&self, slots: &[usize]) -> bool {
        self.slots.iter().any(|s| slots.contains(s))
    }
}

/// Some(true) when the order succeeded, Some(false) when it failed, None while
/// it is still under way. `states` holds `(state, has no process)` per slot.
pub(super) fn verdict(kind: &OpKind, states: &[(InstanceState, bool)]) -> Option<bool> {
    use InstanceState::*;
    match kind {
        OpKind::Stop | OpKind::Scale { grow: false } => {
            states.iter().all(|&(_, idle)| idle).then_some(true)
        }
        OpKind::Restart {
            starting: false, ..
        }
        | OpKind::Replace { .. } => None,
        OpKind::Start | OpKind::Restart { .. } | OpKind::Scale { grow: true } => {
            if states.iter().all(|&(s, _)| s == Running) {
                Some(true)
            } else if states
                .iter()
                .any(|&(s, idle)| matches!(s, Fatal | Exited) || (s == Stopped && idle))
            {
                Some(false)
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    #[test]
    fn start_waits_for_all_running() {
        let k = OpKind::Start;
        assert_eq!(verdict(&k, &[(Running, false), (Starting, false)]), None);
        assert_eq!(verdict(&k, &[(Running, false), (Backoff, true)]), None);
        assert_eq!(
            verdict(&k, &[(Running, false), (Running, false)]),
            Some(true)
        );
        assert_eq!(verdict(&k, &[(Running, false), (Fatal, true)]), Some(false));
        assert_eq!(verdict(&k, &[(Exited, true)]), Some(false));
        assert_eq!(verdict(&k, &[]), Some(true));
    }

    #[test]
    fn stop_waits_for_no_process() {
        let k = OpKind::Stop;
        assert_eq!(verdict(&k, &[(Stopping, false)]), None);
        assert_eq!(verdict(&k, &[(Stopped, true), (Fatal, true)]), Some(true));
    }

    #[test]
    fn restart_first_phase_never_decides() {
        let k = OpKind::Restart {
            starting: false,
            new_config: None,
            instance: None,
        };
        assert_eq!(verdict(&k, &[(Stopped, true)]), None);
    }
}
