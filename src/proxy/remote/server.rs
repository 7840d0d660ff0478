//! The proxy process's side of the channel (`zdt __proxy`): a
//! [`LocalProxy`] run by the orders zdt sends. Orders are applied one at a
//! time, in the order sent; a wait becomes a task that answers when its
//! count reaches zero. A malformed order is logged and skipped. When zdt's
//! end closes, the process stops its proxy and exits.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Answer, Channel, Order, MAX_MESSAGE};
use crate::proxy::table::{LocalDrain, LocalTable};
use crate::proxy::{LocalHandle, LocalProxy};

/// Runs the proxy process on the channel `fd` with `threads` proxy
/// threads, until zdt closes the channel, shuts it down, or retires it.
pub async fn run(fd: OwnedFd, threads: usize) -> std::io::Result<()> {
    let chan = Arc::new(Channel::new(fd)?);
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let writer = {
        let chan = chan.clone();
        tokio::spawn(async move {
            while let Some(a) = rx.recv().await {
                let sent = match serde_json::to_vec(&a) {
                    Ok(bytes) => chan.send(&bytes, &[]).await,
                    Err(e) => Err(std::io::Error::other(e)),
                };
                if let Err(e) = sent {
                    tracing::warn!(cause = %e, "proxy channel: cannot answer zdt");
                }
            }
        })
    };
    let mut proxy = Served {
        proxy: LocalProxy::new(threads),
        tables: HashMap::new(),
        starts: HashMap::new(),
        drains: HashMap::new(),
        answers: tx,
    };
    let mut buf = vec![0; MAX_MESSAGE];
    loop {
        let (n, fds) = match chan.recv(&mut buf).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::debug!("proxy channel closed by zdt");
                break;
            }
            Err(e) => {
                tracing::error!(cause = %e, "proxy channel: cannot read; stopping");
                break;
            }
        };
        let order = match serde_json::from_slice::<Order>(&buf[..n]) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(cause = %e, "proxy channel: an order this proxy cannot read");
                continue;
            }
        };
        match proxy.apply(order, fds).await {
            Step::Go => {}
            Step::Exit => break,
        }
    }
    proxy.proxy.shutdown();
    drop(proxy);
    // The last answers (a retire's) go out before the process ends; waits
    // still pending hold the writer's channel open, hence the bound.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
    Ok(())
}

/// Whether to read the next order.
enum Step {
    Go,
    Exit,
}

/// What the orders built.
struct Served {
    proxy: LocalProxy,
    tables: HashMap<u64, LocalTable>,
    starts: HashMap<u64, LocalHandle>,
    drains: HashMap<u64, Arc<LocalDrain>>,
    /// To the writer task.
    answers: mpsc::UnboundedSender<Answer>,
}

impl Served {
    fn answer(&self, a: Answer) {
        let _ = self.answers.send(a);
    }

    fn table(&self, table: u64) -> Option<&LocalTable> {
        let t = self.tables.get(&table);
        if t.is_none() {
            tracing::warn!(
                table,
                "proxy channel: an order for a table this proxy does not have"
            );
        }
        t
    }

    async fn apply(&mut self, order: Order, fds: Vec<OwnedFd>) -> Step {
        match order {
            Order::Table { table, program } => {
                let mut t = self.proxy.table();
                t.program = program;
                self.tables.insert(table, t);
            }
            Order::DropTable { table } => {
                self.tables.remove(&table);
            }
            Order::Proxied { table, on } => {
                if let Some(t) = self.table(table) {
                    t.set_proxied(on);
                }
            }
            Order::Draining { table, on } => {
                if let Some(t) = self.table(table) {
                    t.set_draining(on);
                }
            }
            Order::Gate { table, gate } => {
                if let Some(t) = self.table(table) {
                    t.set_gate(gate.into());
                }
            }
            Order::Publish { table, set } => {
                if let Some(t) = self.table(table) {
                    t.publish(&set);
                }
            }
            Order::Start {
                start,
                table,
                options,
            } => {
                let sockets: Vec<_> = fds.into_iter().map(Arc::new).collect();
                if let Some(t) = self.table(table) {
                    match self.proxy.start(&t.program.clone(), &sockets, options, t) {
                        Ok(h) => {
                            self.starts.insert(start, h);
                        }
                        Err(e) => {
                            tracing::error!(program = %t.program, cause = %e, "proxy: cannot accept on the sockets")
                        }
                    }
                }
            }
            Order::Stop { start } => {
                self.starts.remove(&start);
            }
            Order::Read { id, table } => {
                let counts = self.tables.get(&table).and_then(|t| t.counters().read());
                self.answer(Answer::Counts { id, counts });
            }
            Order::WaitIdle { id, table } => {
                let counters = self.tables.get(&table).map(LocalTable::counters);
                let answers = self.answers.clone();
                tokio::spawn(async move {
                    if let Some(c) = counters {
                        c.wait_idle().await;
                    }
                    let _ = answers.send(Answer::Done { id });
                });
            }
            Order::DrainBegin {
                drain,
                table,
                process,
            } => {
                if let Some(t) = self.tables.get(&table) {
                    self.drains
                        .insert(drain, Arc::new(t.counters().drain(process)));
                }
            }
            Order::DrainIdle { id, drain } => {
                let d = self.drains.get(&drain).cloned();
                let answers = self.answers.clone();
                tokio::spawn(async move {
                    if let Some(d) = d {
                        d.idle().await;
                    }
                    let _ = answers.send(Answer::Done { id });
                });
            }
            Order::DrainCut { id, drain } => {
                let n = self.drains.get(&drain).map_or(0, |d| d.cut());
                self.answer(Answer::Cut { id, n });
            }
            Order::DrainEnd { drain } => {
                self.drains.remove(&drain);
            }
            Order::Sync { id } => self.answer(Answer::Done { id }),
            Order::Retire {
                id,
                grace,
                deadline,
            } => {
                let retired = self.proxy.retire(grace, deadline).await;
                let (still_open, took) = (retired.still_open, retired.took);
                retired.commit();
                self.answer(Answer::Retired {
                    id,
                    still_open,
                    took,
                });
                return Step::Exit;
            }
            Order::Shutdown => return Step::Exit,
        }
        Step::Go
    }
}
