//! Settling AMQP deliveries: [`AmqpSettler`] records each delivery's ack or release, and
//! [`AckBatcher`] turns the settled tags of one channel into few `basic.ack`s with
//! `multiple`, written by one task per channel ([`send_acks`]) so that neither a finishing
//! task nor the consuming loop waits for lapin's I/O.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::{AmqpBroker, lapin_error};
use crate::broker::{BrokerError, Settle};
use crate::protocol::Envelope;

/// Acknowledges a channel's deliveries in batches: `basic.ack` with `multiple` up to the
/// highest delivery tag below which every delivery is settled. Deliveries finish out of order
/// (tasks run concurrently), so settled tags wait in a set until the prefix is contiguous.
///
/// Settling only records the tag; one task per channel ([`send_acks`]) writes the acks, so
/// neither a finishing task nor the consuming loop waits for lapin's I/O thread. An ack goes
/// out as soon as half the prefetch (at most 64) is pending, else [`ACK_DELAY`] after the
/// first pending settlement: late acks stay late (a delivery is only settled after its result
/// is stored), and a crash redelivers at most those few messages.
pub(super) struct AckBatcher {
    channel: Channel,
    state: Mutex<AckState>,
    /// Woken when the first settlement is pending and when a batch is full.
    pub(super) due: Arc<tokio::sync::Notify>,
}

impl Drop for AckBatcher {
    /// The last holder is gone (the consumer loop has ended and every delivery is settled):
    /// send what is still pending before the channel closes, or those messages would be
    /// redelivered. lapin queues the frame when the call is first polled, ahead of the
    /// channel's close, so one poll is enough.
    fn drop(&mut self) {
        let pending = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(tag) = pending {
            let _ = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .now_or_never();
        }
    }
}

/// What a settlement asks of the ack writer.
#[derive(Debug, PartialEq, Eq)]
enum AckDue {
    /// Nothing new: an ack is already due.
    Nothing,
    /// The first pending settlement: ack within [`ACK_DELAY`].
    Soon,
    /// A full batch: ack now.
    Now,
}

#[derive(Default)]
struct AckState {
    /// Every tag below this one is settled (tags start at 1).
    contiguous_below: u64,
    /// Settled tags above `contiguous_below`, each with whether it needs a `basic.ack`
    /// (false: it was released with its own `basic.nack`).
    settled: BTreeMap<u64, bool>,
    /// Highest tag of the settled prefix that needs an ack and has not been acked on the
    /// wire. Never a released tag: RabbitMQ closes the channel on an ack naming a tag it no
    /// longer holds ("unknown delivery tag"), which would requeue every message in flight
    /// on it. A `multiple` ack up to this tag covers released tags below it harmlessly.
    unacked_upto: Option<u64>,
    pending: u64,
    /// Settled deliveries that trigger an ack at once: at most half the prefetch, or the
    /// broker would stop delivering while the acks wait for the timer.
    batch: u64,
}

/// The largest ack batch.
const ACK_BATCH: u64 = 64;

/// The longest an ack waits for its batch to fill.
const ACK_DELAY: Duration = Duration::from_millis(1);

impl AckState {
    /// Records `tag` as settled; `acked` says whether it still needs a `basic.ack` (a
    /// released delivery was nacked on its own). Says when the ack writer should act.
    fn settle(&mut self, tag: u64, acked: bool) -> AckDue {
        if tag == self.contiguous_below {
            if acked {
                self.unacked_upto = Some(tag);
            }
            self.contiguous_below += 1;
            while let Some(needs_ack) = self.settled.remove(&self.contiguous_below) {
                if needs_ack {
                    self.unacked_upto = Some(self.contiguous_below);
                }
                self.contiguous_below += 1;
            }
        } else if tag > self.contiguous_below {
            self.settled.insert(tag, acked);
        }
        let first = self.pending == 0;
        if acked {
            self.pending += 1;
        }
        if self.pending >= self.batch {
            AckDue::Now
        } else if first {
            AckDue::Soon
        } else {
            AckDue::Nothing
        }
    }

    /// True when a full batch waits.
    fn full(&self) -> bool {
        self.pending >= self.batch
    }

    /// The tag to ack up to now, if any.
    fn take(&mut self) -> Option<u64> {
        self.pending = 0;
        self.unacked_upto.take()
    }
}

impl AckBatcher {
    /// A batcher for `channel`, whose consumers have `prefetch` as their QoS.
    pub(super) fn new(channel: Channel, prefetch: u16) -> Arc<Self> {
        Arc::new(Self {
            channel,
            state: Mutex::new(AckState {
                contiguous_below: 1,
                batch: (u64::from(prefetch) / 2).clamp(1, ACK_BATCH),
                ..AckState::default()
            }),
            due: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Records `tag` as settled and wakes the ack writer when an ack becomes due.
    fn settle(&self, tag: u64, acked: bool) {
        let due = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .settle(tag, acked);
        if due != AckDue::Nothing {
            self.due.notify_one();
        }
    }

    fn full(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .full()
    }

    /// The tag to ack up to now, if any.
    fn take(&self) -> Option<u64> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    async fn ack_upto(&self, tag: u64) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| lapin_error("cannot ack", &e))
    }

    /// Sends the pending ack, if any.
    pub(super) async fn flush(&self) -> Result<(), BrokerError> {
        match self.take() {
            Some(tag) => self.ack_upto(tag).await,
            None => Ok(()),
        }
    }
}

/// Writes a channel's batched acks (see [`AckBatcher`]) while anything else holds the
/// batcher. It holds only a weak reference, so the channel closes as soon as the consumer
/// loop has ended and every delivery it handed out is settled (the batcher's `Drop` sends
/// the last ack).
pub(super) async fn send_acks(batcher: std::sync::Weak<AckBatcher>, due: Arc<tokio::sync::Notify>) {
    loop {
        // Wait for a pending settlement; look every 100 ms whether the batcher is gone.
        tokio::select! {
            () = due.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let Some(batcher) = batcher.upgrade() else {
            return;
        };
        if !batcher.full() {
            // Give the batch a moment to fill, unless it fills first.
            tokio::select! {
                () = due.notified() => {}
                () = tokio::time::sleep(ACK_DELAY) => {}
            }
        }
        if let Err(error) = batcher.flush().await {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "cannot ack; the messages will be redelivered"
            );
        }
    }
}

/// Settles one AMQP delivery; keeps its channel open (through the batcher) until settled.
pub(super) struct AmqpSettler {
    pub(super) acker: lapin::Acker,
    /// The delivery's tag on its channel.
    pub(super) tag: u64,
    pub(super) batcher: Arc<AckBatcher>,
    /// Publishes the dead letter.
    pub(super) broker: AmqpBroker,
    /// The queue it came from.
    pub(super) queue: String,
    /// How many times it has been delivered, recorded in its dead letter.
    pub(super) delivery_count: u32,
}

#[async_trait]
impl Settle for AmqpSettler {
    async fn ack(&self, _tag: u64) -> Result<(), BrokerError> {
        self.batcher.settle(self.tag, true);
        Ok(())
    }

    async fn dead_letter(
        &self,
        _tag: u64,
        reason: &str,
        envelope: &Envelope,
    ) -> Result<(), BrokerError> {
        self.broker
            .publish_dead_letter(&self.queue, envelope, reason, self.delivery_count)
            .await?;
        self.ack(0).await
    }

    async fn release(&self, _tag: u64) -> Result<(), BrokerError> {
        let released = self
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .map(drop)
            .map_err(|e| lapin_error("cannot release", &e));
        self.batcher.settle(self.tag, false);
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_cover_only_contiguous_settled_tags() {
        let mut state = AckState {
            contiguous_below: 1,
            batch: ACK_BATCH,
            ..AckState::default()
        };
        // 2 and 3 finish before 1: nothing can be acked yet (the writer is woken once).
        assert_eq!(state.settle(2, true), AckDue::Soon);
        assert_eq!(state.settle(3, true), AckDue::Nothing);
        assert_eq!(state.take(), None);
        // 1 finishes: everything up to 3 can go in one multiple ack.
        assert_eq!(state.settle(1, true), AckDue::Soon);
        assert_eq!(state.take(), Some(3));
        assert_eq!(state.take(), None);
        // A released (nacked) delivery does not block the ones after it.
        state.settle(4, false);
        state.settle(5, true);
        assert_eq!(state.take(), Some(5));
        // ...and is never the tag an ack names: RabbitMQ no longer holds it, and would
        // close the channel ("unknown delivery tag"), requeueing everything on it.
        state.settle(6, true);
        state.settle(7, false);
        assert_eq!(state.take(), Some(6));
        state.settle(8, false);
        assert_eq!(state.take(), None);
        // A full batch asks to be flushed at once.
        let mut dues = Vec::new();
        for tag in 9..9 + ACK_BATCH {
            dues.push(state.settle(tag, true));
        }
        assert_eq!(dues.first(), Some(&AckDue::Soon));
        assert_eq!(dues.last(), Some(&AckDue::Now));
        assert!(state.full());
        assert_eq!(state.take(), Some(8 + ACK_BATCH));
        assert!(!state.full());
    }
}
