//! What other cores send this core (`XMsg`: data to deliver, control to keep its view of them), taken
//! in bounded batches.

use std::time::Instant;

use smallvec::SmallVec;

use super::shared::Members;
use super::{Core, DRAIN_BATCH};
use crate::xcore::{Control, CoreId, Data, XMsg};

impl Core {
    /// Processes what other cores sent. Returns how many messages were taken.
    pub fn drain_inbound(&mut self, now: Instant) -> usize {
        self.at(now);
        if self.inbound_paused() {
            return 0;
        }
        let mut batch = std::mem::take(&mut self.inbound);
        let always = self.persist.as_ref().is_some_and(|p| p.always);
        let mut runs: SmallVec<[(CoreId, usize); 4]> = SmallVec::new();
        let n = if always {
            let mut r = Vec::new();
            let n = self.mesh.drain_with_sources(DRAIN_BATCH, &mut batch, &mut r);
            runs.extend(r);
            n
        } else {
            self.mesh.drain(DRAIN_BATCH, &mut batch)
        };
        // fsync = "always": how many publishes came from each source, to confirm them once durable.
        let mut publishes: SmallVec<[(CoreId, u64); 4]> = SmallVec::new();
        if always {
            let mut at = 0;
            for &(src, count) in &runs {
                let k = batch
                    .get(at..at + count)
                    .map_or(0, |ms| ms.iter().filter(|m| matches!(m, XMsg::Data(_))).count());
                at += count;
                if k > 0 {
                    publishes.push((src, k as u64));
                }
            }
        }
        for m in batch.drain(..) {
            match m {
                XMsg::Data(d) => self.take_data(d),
                XMsg::Control(c) => self.take_control(c),
            }
        }
        self.inbound = batch;
        if let Some(p) = &mut self.persist {
            for (src, k) in publishes {
                p.received_from(src, k);
            }
        }
        n
    }

    /// A message to deliver here.
    fn take_data(&mut self, d: Data) {
        match d {
            Data::Publish(msg) => {
                if msg.retain {
                    self.store_retained(&msg);
                }
                self.deliver_local(&msg, None);
            }
            Data::SharedPublish { msg, group, hops } => self.deliver_shared(&group, &msg, hops),
        }
    }

    /// What another core says of its state.
    fn take_control(&mut self, c: Control) {
        match c {
            Control::Interest { core, filter, add } => {
                if add {
                    self.interest.insert(&filter, core, ());
                } else {
                    self.interest.remove(&filter, core);
                }
            }
            Control::Congestion { key, filter, on } => {
                if on {
                    self.congested.insert(&filter, key, ());
                } else {
                    self.congested.remove(&filter, key);
                    self.retry_held = true;
                }
            }
            Control::Handoff(h) => self.handoffs.push(h),
            Control::Shared { core, group, filter, ready, online, total } => {
                let cores = self.cores();
                let m = Members { ready, online, total };
                if self.shared_views.update(cores, core, &group, &filter, m) {
                    self.retry_held = true;
                }
            }
            Control::Durable { core, upto } => {
                if let Some(p) = &mut self.persist {
                    p.confirmed_by(core, upto);
                }
            }
        }
    }
}
