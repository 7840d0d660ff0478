//! Canary restarts (proxy mode): the new generation starts and gets ready
//! as in a zero-downtime restart, then serves a share of new clients beside
//! the old one instead of taking over; `promote` or `rollback` ends it.
//!
//! The states, and what moves between them:
//!
//! | state                | event                         | next                                  |
//! |----------------------|-------------------------------|---------------------------------------|
//! | running (gen N)      | `restart --canary P`          | replace op with `canary: Some(P)`     |
//! | replace op           | a candidate fails             | gen N serves alone; the order fails   |
//! | replace op           | every candidate ready         | canary: N+1 in [`CanaryRun`] slots    |
//! | canary               | promote                       | N+1 in `slots`, N drains, then done   |
//! | canary               | rollback                      | N keeps `slots`, N+1 drains, then done|
//! | canary               | stop, shutdown, removal       | both stop (the canary drains first)   |
//! | canary               | restart, start, reload        | refused: promote or roll back first   |
//!
//! A crash in either generation during a canary is an ordinary crash of
//! that slot: autorestart in the same generation, with backoff.

use tokio::sync::{mpsc, oneshot};

use crate::config::{Mode, Protocol};
use crate::control::proto::Reply;
use crate::proxy::CanarySplit;
use crate::state::{CanaryStatus, GenerationTraffic, InstanceState};

use super::ops::{Op, OpKind};
use super::{CanaryRun, OpError, OpResult, Program, Slot};

impl Program {
    /// `restart --canary percent`: checks that a canary can run, then
    /// starts the new generation beside the running one.
    pub(super) fn begin_canary(
        &mut self,
        instance: Option<u32>,
        percent: u8,
        progress: Option<mpsc::Sender<Reply>>,
        reply: oneshot::Sender<OpResult>,
    ) {
        match self.canary_refusal(instance, percent) {
            Some(e) => drop(reply.send(Err(e))),
            None => self.begin_replace(None, progress, reply, None, Some(percent)),
        }
    }

    /// Why a canary cannot start now, if it cannot.
    fn canary_refusal(&self, instance: Option<u32>, percent: u8) -> Option<OpError> {
        let name = &self.config.name;
        let why = if self.config.mode != Mode::Proxy {
            format!("{name} is in pass mode: the kernel picks which process accepts each connection, so zdt cannot split traffic between generations; a canary needs mode = \"proxy\"")
        } else if self.config.protocol != Protocol::Http {
            format!("{name} uses protocol = \"tcp\": a canary needs protocol = \"http\", where zdt sees each request and can keep a client on its generation")
        } else if !(1..=99).contains(&percent) {
            format!(
                "canary percentage {percent}: use 1 to 99 (0 is no canary; 100 is a plain restart)"
            )
        } else if let Some(i) = instance {
            format!("a canary starts a whole new generation: name the program ({name}), not one instance ({name}:{i})")
        } else if let Some(e) = self.restart_busy() {
            return Some(e);
        } else if let Some(s) = self
            .slots
            .iter()
            .find(|s| s.state() != InstanceState::Running)
        {
            format!(
                "{name}:{} is {}: a canary runs beside a generation whose every instance serves; start it or restart it first",
                s.index(),
                s.state()
            )
        } else {
            return None;
        };
        Some(OpError::plain(why))
    }

    /// Every candidate of the replace op at `index` is ready: they become
    /// the canary's slots and serve beside the old generation. The order
    /// is done.
    pub(super) fn start_canary(
        &mut self,
        index: usize,
        gen: u64,
        percent: u8,
        todo: &[usize],
        ready_ms: &str,
    ) -> OpResult {
        let stable_gen = todo
            .iter()
            .map(|&s| self.slots[s].current_gen())
            .max()
            .unwrap_or(0);
        let cfg = &self.config;
        let slots: Vec<Slot> = todo
            .iter()
            .filter_map(|&s| self.slots[s].split_canary(cfg))
            .collect();
        let name = self.config.name.clone();
        let how = match &self.config.canary_header {
            Some(h) => format!(
                "by a hash of {h}, else by the {} cookie",
                crate::proxy::CANARY_COOKIE
            ),
            None => format!("by the {} cookie", crate::proxy::CANARY_COOKIE),
        };
        self.ops[index].progress(format!(
            "{name}: gen {gen}: {n}/{n} ready in {ready_ms} ms; canary: gen {gen} takes {percent} % of new clients (sticky {how}), gen {stable_gen} the rest",
            n = slots.len()
        ));
        tracing::info!(program = %name, gen, stable_gen, percent, "canary serving");
        self.canary = Some(CanaryRun {
            gen,
            stable_gen,
            percent,
            slots,
        });
        // Published before the reply, which the supervisor answers from
        // the snapshot (the canary's generations and share).
        self.publish();
        let all: Vec<usize> = (0..self.slots.len()).collect();
        let mut snaps = self.snapshots_of(&all);
        snaps.extend(
            self.canary
                .iter()
                .flat_map(|c| &c.slots)
                .map(|s| s.snapshot(&name)),
        );
        Ok(snaps)
    }

    /// Promote (`promote`) or roll back: one generation takes all traffic
    /// at once, the other drains as an old generation does after a restart.
    /// The order is done when it is gone.
    pub(super) fn end_canary(
        &mut self,
        promote: bool,
        progress: Option<mpsc::Sender<Reply>>,
        reply: oneshot::Sender<OpResult>,
    ) {
        let name = self.config.name.clone();
        let Some(run) = &self.canary else {
            let _ = reply.send(Err(OpError::plain(format!("no canary running for {name}"))));
            return;
        };
        if promote {
            if let Some(s) = run
                .slots
                .iter()
                .find(|s| s.state() != InstanceState::Running)
            {
                let _ = reply.send(Err(OpError {
                    message: format!(
                        "{name}:{} of canary gen {} is {}{}: promote needs every canary instance running; wait for it, or roll back (zdtctl rollback {name})",
                        s.index(),
                        run.gen,
                        s.state(),
                        s.reason().map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                    log_tail: Some(s.log_tail(20)),
                    kept_previous_config: false,
                }));
                return;
            }
        }
        let Some(run) = self.canary.take() else {
            return;
        };
        for s in run.slots {
            let i = s.index();
            if promote {
                let old = std::mem::replace(&mut self.slots[i], s);
                self.slots[i].absorb(old, &self.config);
            } else {
                self.slots[i].absorb(s, &self.config);
            }
        }
        let (winner, loser) = if promote {
            (run.gen, run.stable_gen)
        } else {
            (run.stable_gen, run.gen)
        };
        tracing::info!(program = %name, winner, loser, promote, "canary ended");
        let slots: Vec<usize> = (0..self.slots.len()).collect();
        let op = Op::new(
            OpKind::Replace {
                gen: winner,
                rolling: false,
                todo: Vec::new(),
                started: std::time::Instant::now(),
                switched: Some(std::time::Instant::now()),
                previous: None,
                canary: None,
            },
            slots,
            reply,
            progress,
        );
        op.progress(format!(
            "{name}: gen {winner} takes all traffic; gen {loser}: stopping"
        ));
        self.ops.push(op);
    }

    /// The canary half of the routes, if a canary runs.
    pub(super) fn canary_routes(&self) -> Option<CanarySplit> {
        let c = self.canary.as_ref()?;
        Some(CanarySplit {
            generation: c.gen,
            stable_generation: c.stable_gen,
            percent: c.percent,
            header: self.config.canary_header.clone(),
            routes: c.slots.iter().filter_map(Slot::route).collect(),
        })
    }

    /// The canary for the snapshot (its counters are read in at status).
    pub(super) fn canary_status(&self) -> Option<CanaryStatus> {
        let c = self.canary.as_ref()?;
        let gen = |generation| GenerationTraffic {
            generation,
            ..GenerationTraffic::default()
        };
        Some(CanaryStatus {
            percent: c.percent,
            header: self.config.canary_header.clone(),
            stable: gen(c.stable_gen),
            canary: gen(c.gen),
        })
    }
}
