//! The reaper pool: destroys the domains of normally ended transactions after the caller
//! has its answer, and tells when every such retirement is done (tests, shutdown).

use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_ledger::Ledger;

use crate::retire::{record_end, retire, Retirement};
use crate::types::Served;

/// Reaper threads: destroy the domains of normally ended transactions after the caller
/// has its answer.
pub(crate) struct Reaper {
    sender: Mutex<Option<mpsc::Sender<(Retirement, Served)>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Retirements queued or running.
    pending: Arc<(Mutex<usize>, Condvar)>,
}

/// Reaper threads per executor: destroying waits for the domain to be gone, so several
/// run at once.
const REAPERS: usize = 4;

impl Reaper {
    pub(crate) fn start(ledger: &Ledger) -> Self {
        let (sender, receiver) = mpsc::channel::<(Retirement, Served)>();
        let receiver = Arc::new(Mutex::new(receiver));
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let mut threads = Vec::new();
        for i in 0..REAPERS {
            let (receiver, ledger, pending) = (receiver.clone(), ledger.clone(), pending.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("reaper-{i}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok((retirement, served)) => {
                            retire(&ledger, retirement, served);
                            let (count, cv) = &*pending;
                            if let Ok(mut n) = count.lock() {
                                *n = n.saturating_sub(1);
                                cv.notify_all();
                            }
                        }
                        Err(_) => return,
                    }
                });
            if let Ok(handle) = spawned {
                threads.push(handle);
            }
        }
        // With no thread at all, `send` fails and domains are destroyed inline.
        let sender = (!threads.is_empty()).then_some(sender);
        Self {
            sender: Mutex::new(sender),
            threads: Mutex::new(threads),
            pending,
        }
    }

    /// Queues a retirement; gives it back if the reaper is stopped.
    pub(crate) fn send(&self, r: Retirement, served: Served) -> Result<(), Box<Retirement>> {
        let Ok(guard) = self.sender.lock() else {
            return Err(Box::new(r));
        };
        let Some(sender) = guard.as_ref() else {
            return Err(Box::new(r));
        };
        let (count, _) = &*self.pending;
        if let Ok(mut n) = count.lock() {
            *n += 1;
        }
        sender.send((r, served)).map_err(|mpsc::SendError((r, _))| {
            if let Ok(mut n) = count.lock() {
                *n = n.saturating_sub(1);
            }
            Box::new(r)
        })
    }

    /// Destroys the domain of a normally ended transaction without a thread of ours waiting:
    /// the backend calls back when it is gone, and the audit records are appended then.
    pub(crate) fn retire_in_background(&self, ledger: &Ledger, r: Retirement, served: Served) {
        if let Ok(mut n) = self.pending.0.lock() {
            *n += 1;
        }
        let Retirement { domain, ended } = r;
        let (ledger, pending) = (ledger.clone(), Arc::clone(&self.pending));
        domain.destroy_in_background(Box::new(move |disposed| {
            record_end(&ledger, ended, served, disposed);
            let (count, cv) = &*pending;
            if let Ok(mut n) = count.lock() {
                *n = n.saturating_sub(1);
                cv.notify_all();
            }
        }));
    }

    /// Waits until no retirement is pending, or `limit` passes; returns how many still are.
    pub(crate) fn wait_idle(&self, limit: Option<Duration>) -> usize {
        let deadline = limit.and_then(|l| Instant::now().checked_add(l));
        let (count, cv) = &*self.pending;
        let Ok(mut n) = count.lock() else {
            return 0;
        };
        while *n > 0 {
            let wait = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return *n,
                },
            };
            n = match wait {
                None => match cv.wait(n) {
                    Ok(n) => n,
                    Err(_) => return 0,
                },
                Some(left) => match cv.wait_timeout(n, left) {
                    Ok((n, _)) => n,
                    Err(_) => return 0,
                },
            };
        }
        0
    }

    /// Destroys everything queued, then stops the threads.
    pub(crate) fn stop(&self) {
        if let Ok(mut s) = self.sender.lock() {
            *s = None;
        }
        if let Ok(mut threads) = self.threads.lock() {
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}
