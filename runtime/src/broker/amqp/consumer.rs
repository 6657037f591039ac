//! Consuming: [`AmqpConsumer`] hands out deliveries from one or more work queues, with
//! per-channel QoS = prefetch. A supervisor task owns the channel; when the connection drops
//! it reconnects with backoff and resumes consuming, and the consumer reports whether it is
//! actually consuming right now. Each delivery counts its deliveries: quorum queues say so
//! themselves, and a classic-queue redelivery is published again carrying its count, so a
//! message that kills every worker is dead-lettered after `max_deliveries` instead of looping
//! forever. The queues consumed can change while it runs ([`Subscriptions`]: Celery's
//! `add_consumer`/`cancel_consumer`): a queue added is declared and consumed on the same
//! channel, a queue cancelled gets a `basic.cancel`, and a reconnect consumes the set as it
//! is then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::acks::{AckBatcher, AmqpSettler, send_acks};
use super::codec::envelope_of;
use super::dead_letters::DEAD_DELIVERIES_HEADER;
use super::{AmqpBroker, lapin_error};
use crate::broker::{Broker, BrokerError, Consumer, Delivery, Settle, Subscriptions};

/// Deliveries from a supervised AMQP consumer.
pub struct AmqpConsumer {
    receiver: mpsc::Receiver<Result<Delivery, BrokerError>>,
    status: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    supervisor: tokio::task::JoinHandle<()>,
    /// The current channel's ack batcher, to flush before the worker exits.
    batcher: Arc<Mutex<Option<Arc<AckBatcher>>>>,
    /// The queues consumed, changeable while it runs.
    subscriptions: Subscriptions,
}

impl AmqpConsumer {
    /// Starts consuming `queues` from `broker` with at most `prefetch` unsettled deliveries,
    /// supervised: it reconnects by itself until closed.
    pub(super) fn start(broker: &AmqpBroker, queues: &[String], prefetch: usize) -> Self {
        let (deliveries, receiver) = mpsc::channel(prefetch.max(1) * 2);
        let (consuming, status) = watch::channel(false);
        let (stop, stopped) = watch::channel(false);
        let batcher: Arc<Mutex<Option<Arc<AckBatcher>>>> = Arc::default();
        let subscriptions = Subscriptions::new(queues);
        let supervisor = tokio::spawn(supervise(
            broker.clone(),
            subscriptions.watch(),
            u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX),
            deliveries,
            consuming,
            stopped,
            Arc::clone(&batcher),
        ));
        Self {
            receiver,
            status,
            stop,
            supervisor,
            batcher,
            subscriptions,
        }
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        self.receiver
            .recv()
            .await
            .unwrap_or(Err(BrokerError::Closed))
    }

    async fn close(&mut self) {
        let _ = self.stop.send(true);
        self.receiver.close();
        // Deliveries received but not handed out go back to the queue.
        while let Ok(delivery) = self.receiver.try_recv() {
            if let Ok(delivery) = delivery {
                let _ = delivery.release().await;
            }
        }
        // Let the supervisor cancel its consumers: aborted in the middle of starting one
        // (dropped right after a quick stop), it would leave a consumer on a connection that
        // lives on (shared with a client), holding the messages it is sent unacked.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.supervisor).await;
    }

    fn consuming(&self) -> Option<watch::Receiver<bool>> {
        Some(self.status.clone())
    }

    fn subscriptions(&self) -> Option<Subscriptions> {
        Some(self.subscriptions.clone())
    }

    async fn flush_acks(&mut self) {
        let batcher = self
            .batcher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(batcher) = batcher
            && let Err(error) = batcher.flush().await
        {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "cannot send the last acks; those messages will be redelivered"
            );
        }
    }
}

/// Consumes the queues `queues` names for as long as the consumer lives, reconnecting with
/// backoff.
async fn supervise(
    broker: AmqpBroker,
    mut queues: watch::Receiver<Vec<String>>,
    prefetch: u16,
    deliveries: mpsc::Sender<Result<Delivery, BrokerError>>,
    consuming: watch::Sender<bool>,
    mut stopped: watch::Receiver<bool>,
    batcher: Arc<Mutex<Option<Arc<AckBatcher>>>>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stopped.borrow() {
            return;
        }
        match consume_once(
            &broker,
            &mut queues,
            prefetch,
            &deliveries,
            &consuming,
            &mut stopped,
            &batcher,
        )
        .await
        {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost) => backoff = Duration::from_millis(250),
            Err(error) => tracing::warn!(
                error = &error as &dyn std::error::Error,
                "cannot consume; retrying in {backoff:?}"
            ),
        }
        let _ = consuming.send(false);
        if deliveries.is_closed() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stopped.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

/// How one consumption ([`consume_once`]) ended.
enum Ended {
    /// Asked to stop.
    Stopped,
    /// The channel or connection went away.
    Lost,
}

/// Consumes the queues `wanted` names on one channel of the current session (following its
/// changes) until asked to stop or until the channel or connection is lost, handing each
/// delivery (with its delivery count) to `deliveries`.
async fn consume_once(
    broker: &AmqpBroker,
    wanted: &mut watch::Receiver<Vec<String>>,
    prefetch: u16,
    deliveries: &mpsc::Sender<Result<Delivery, BrokerError>>,
    consuming: &watch::Sender<bool>,
    stopped: &mut watch::Receiver<bool>,
    current_batcher: &Mutex<Option<Arc<AckBatcher>>>,
) -> Result<Ended, BrokerError> {
    let session = broker.session().await?;
    let queues = wanted.borrow_and_update().clone();
    for queue in &queues {
        if let Err(error) = broker.ensure_queue(&session, queue).await {
            broker.invalidate(&session).await;
            return Err(error);
        }
    }
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(|e| lapin_error("cannot open a channel", &e))?;
    channel
        // One queue: per-consumer QoS, the same limit, and the only kind quorum queues (e.g.
        // declared by Celery for native delayed delivery) accept. Several queues: one limit
        // for the channel, as Celery sets it.
        .basic_qos(
            prefetch,
            BasicQosOptions {
                global: queues.len() > 1,
            },
        )
        .await
        .map_err(|e| lapin_error("cannot set QoS", &e))?;
    let mut merged = futures_util::stream::SelectAll::new();
    // Queue → consumer tag.
    let mut tags: HashMap<String, String> = HashMap::new();
    for queue in &queues {
        let (tag, stream) = start_consuming(&channel, queue).await?;
        merged.push(stream);
        tags.insert(queue.clone(), tag);
    }
    let _ = consuming.send(true);
    tracing::info!(broker = %broker.describe(), queues = %queues.join(","), "consuming");
    let batcher = AckBatcher::new(channel.clone(), prefetch);
    *current_batcher
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&batcher));
    tokio::spawn(send_acks(
        Arc::downgrade(&batcher),
        Arc::clone(&batcher.due),
    ));
    loop {
        tokio::select! {
            Ok(()) = wanted.changed() => {
                let now = wanted.borrow_and_update().clone();
                follow(broker, &session, &channel, &now, &mut tags, &mut merged).await?;
            }
            next = merged.next(), if !merged.is_empty() => match next {
                Some((queue, Ok(delivery))) => {
                    let mut envelope = envelope_of(&delivery.properties, delivery.data);
                    // Quorum queues count deliveries; classic queues only say "redelivered",
                    // so wasmq carries the count in the message itself (see below).
                    let quorum_count = envelope.headers.get("x-delivery-count").and_then(Value::as_u64);
                    let earlier = envelope.headers.get(DEAD_DELIVERIES_HEADER).and_then(Value::as_u64).unwrap_or(0);
                    let delivery_count = quorum_count
                        .map_or(earlier + 1, |n| n + 1);
                    let delivery_count = u32::try_from(delivery_count).unwrap_or(u32::MAX);
                    let recount = delivery.redelivered && quorum_count.is_none();
                    let settler = Arc::new(AmqpSettler {
                        acker: delivery.acker,
                        tag: delivery.delivery_tag,
                        batcher: Arc::clone(&batcher),
                        broker: broker.clone(),
                        queue: queue.clone(),
                        delivery_count,
                    });
                    if recount {
                        // A classic-queue redelivery (its worker died or released it): publish
                        // the message again carrying how many deliveries it has had, and ack
                        // this copy, so a message that kills every worker is recognised after
                        // `max_deliveries` and dead-lettered instead of looping forever.
                        envelope.headers.insert(DEAD_DELIVERIES_HEADER.into(), u64::from(delivery_count).into());
                        // Inline, not spawned: the ack must reach the channel before this
                        // consumer can close, or both copies would come back.
                        match broker.publish_to_queue(&queue, &envelope, None).await {
                            Ok(()) => {
                                let _ = Settle::ack(settler.as_ref(), 0).await;
                                let _ = batcher.flush().await;
                            }
                            Err(error) => {
                                tracing::warn!(error = &error as &dyn std::error::Error, "cannot count a redelivery; releasing the message");
                                let _ = Settle::release(settler.as_ref(), 0).await;
                            }
                        }
                        continue;
                    }
                    let ours = Delivery::new(envelope, queue, delivery_count, delivery.delivery_tag, settler);
                    if let Err(mpsc::error::SendError(unsent)) = deliveries.send(Ok(ours)).await {
                        // The consumer is closing: give it back and stop consuming, or the
                        // broker keeps delivering to a consumer nobody reads.
                        if let Ok(unsent) = unsent {
                            let _ = unsent.release().await;
                        }
                        for tag in tags.values() {
                            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                        }
                        let _ = consuming.send(false);
                        return Ok(Ended::Stopped);
                    }
                }
                Some((queue, Err(error))) => {
                    tracing::warn!(%error, queue, "lost the broker connection; reconnecting");
                    broker.invalidate(&session).await;
                    return Ok(Ended::Lost);
                }
                // The last queue was cancelled on purpose: wait for one to be added.
                None if tags.is_empty() => {}
                None => {
                    tracing::warn!("the broker cancelled consumption; reconnecting");
                    broker.invalidate(&session).await;
                    return Ok(Ended::Lost);
                }
            },
            _ = stopped.changed() => {
                for tag in tags.values() {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                }
                let _ = consuming.send(false);
                // Deliveries already handed out may still be settled: `send_acks` keeps
                // acking them until the last of them is gone.
                return Ok(Ended::Stopped);
            }
        }
    }
}

/// The deliveries of one queue, each with the queue it came from.
type QueueStream = futures_util::stream::BoxStream<
    'static,
    (String, Result<lapin::message::Delivery, lapin::Error>),
>;

/// Starts consuming `queue` on `channel`: its consumer tag and its deliveries.
async fn start_consuming(
    channel: &lapin::Channel,
    queue: &str,
) -> Result<(String, QueueStream), BrokerError> {
    let tag = format!(
        "wasmq-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_error(&format!("cannot consume {queue}"), &e))?;
    let queue = queue.to_owned();
    Ok((tag, consumer.map(move |d| (queue.clone(), d)).boxed()))
}

/// Makes the channel consume exactly the queues `wanted` names: declares and consumes the
/// new ones, cancels the ones no longer named (their stream ends by itself).
async fn follow(
    broker: &AmqpBroker,
    session: &super::Session,
    channel: &lapin::Channel,
    wanted: &[String],
    tags: &mut HashMap<String, String>,
    merged: &mut futures_util::stream::SelectAll<QueueStream>,
) -> Result<(), BrokerError> {
    let gone: Vec<String> = tags
        .keys()
        .filter(|queue| !wanted.contains(queue))
        .cloned()
        .collect();
    for queue in gone {
        if let Some(tag) = tags.remove(&queue) {
            channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(|e| lapin_error(&format!("cannot stop consuming {queue}"), &e))?;
            tracing::info!(queue, "no longer consuming");
        }
    }
    for queue in wanted {
        if tags.contains_key(queue) {
            continue;
        }
        broker.ensure_queue(session, queue).await?;
        let (tag, stream) = start_consuming(channel, queue).await?;
        merged.push(stream);
        tags.insert(queue.clone(), tag);
        tracing::info!(queue, "consuming");
    }
    Ok(())
}
