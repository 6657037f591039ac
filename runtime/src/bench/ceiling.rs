//! The raw AMQP ceiling for `wasmq bench amqp`: the fastest a minimal lapin consumer can
//! drain a queue of small persistent messages on this broker, acking each message or every
//! `ack_every`-th with `multiple`, and the fastest round trip through it. No decoding, no
//! work, no results: the physical limit that wasmq's throughput is compared with.
//!
//! This is the one place outside `broker/` that uses lapin, on purpose: it measures lapin
//! and RabbitMQ without wasmq, so it must not go through wasmq's broker.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use anyhow::Context as _;

/// How long a raw run's two halves took.
pub(super) struct RawRun {
    /// Publishing every message, at most `confirm_window` awaiting their confirmation,
    /// until the last was confirmed.
    pub(super) publish: Duration,
    /// Draining them, from the first delivery to the last ack.
    pub(super) drain: Duration,
}

/// Publishes `count` copies of `body` with `properties` (made persistent) to a fresh queue,
/// with at most `confirm_window` awaiting their confirmation (as a client with a confirm
/// window does), then drains it with one consumer (QoS `prefetch`), acking every
/// `ack_every`-th delivery with `multiple`.
///
/// # Errors
/// When RabbitMQ cannot be reached or refuses an operation.
pub(super) async fn raw_drain(
    uri: &str,
    count: usize,
    body: &[u8],
    properties: &BasicProperties,
    confirm_window: usize,
    prefetch: u16,
    ack_every: u64,
) -> anyhow::Result<RawRun> {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .context("AMQP connect")?;
    let queue = format!("wasmq-bench-raw-{}", uuid::Uuid::new_v4().simple());
    let publisher = connection.create_channel().await.context("AMQP channel")?;
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("AMQP declare")?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("AMQP confirms")?;
    let publishing = Instant::now();
    let mut unconfirmed = VecDeque::with_capacity(confirm_window);
    for _ in 0..count {
        if unconfirmed.len() >= confirm_window.max(1)
            && let Some(oldest) = unconfirmed.pop_front()
        {
            confirmed(oldest).await?;
        }
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.clone().with_delivery_mode(2),
            )
            .await
            .context("AMQP publish")?;
        unconfirmed.push_back(confirm);
    }
    for confirm in unconfirmed {
        confirmed(confirm).await?;
    }
    let publish = publishing.elapsed();

    let consumer_channel = connection.create_channel().await.context("AMQP channel")?;
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("AMQP qos")?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "wasmq-bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("AMQP consume")?;
    let mut started = None;
    let mut received: u64 = 0;
    let total = count as u64;
    while received < total {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery.context("AMQP delivery")?;
        started.get_or_insert_with(Instant::now);
        received += 1;
        if received.is_multiple_of(ack_every) || received == total {
            delivery
                .acker
                .ack(BasicAckOptions {
                    multiple: ack_every > 1,
                })
                .await
                .context("AMQP ack")?;
        }
    }
    let drain = started.map(|s| s.elapsed()).unwrap_or_default();
    let _ = publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "OK".into()).await;
    Ok(RawRun { publish, drain })
}

/// Awaits one publisher confirmation; a negative one is an error.
async fn confirmed(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await.context("AMQP confirm")? {
        lapin::Confirmation::Nack(_) => anyhow::bail!("RabbitMQ refused a message"),
        _ => Ok(()),
    }
}

/// The raw AMQP round trip: one connection publishes a persistent message (`body` with
/// `properties`) to a fresh queue,
/// where a consumer (in the same process, no acks) answers each one with a transient
/// message to a reply queue, which the sender consumes — the broker's part of a task round
/// trip with rpc results, with no decoding and no work. Returns the `n` round trips in
/// milliseconds, sorted.
///
/// # Errors
/// When RabbitMQ cannot be reached or refuses an operation.
pub(super) async fn raw_round_trips(
    uri: &str,
    n: usize,
    body: &[u8],
    properties: &BasicProperties,
) -> anyhow::Result<Vec<f64>> {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .context("AMQP connect")?;
    let id = uuid::Uuid::new_v4().simple();
    let (requests, replies) = (
        format!("wasmq-bench-raw-rtt-{id}"),
        format!("wasmq-bench-raw-rtt-{id}.reply"),
    );
    let channel = connection.create_channel().await.context("AMQP channel")?;
    for (queue, durable) in [(&requests, true), (&replies, false)] {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    auto_delete: !durable,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("AMQP declare")?;
    }
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let answerer = connection.create_channel().await.context("AMQP channel")?;
    let mut incoming = answerer
        .basic_consume(
            requests.as_str().into(),
            "answerer".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .context("AMQP consume")?;
    let reply_to = replies.clone();
    let answering = tokio::spawn(async move {
        while let Some(Ok(delivery)) = incoming.next().await {
            let _ = answerer
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    BasicProperties::default().with_delivery_mode(1),
                )
                .await;
        }
    });
    let mut answers = channel
        .basic_consume(
            replies.as_str().into(),
            "asker".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .context("AMQP consume")?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..=n {
        let started = Instant::now();
        channel
            .basic_publish(
                "".into(),
                requests.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.clone().with_delivery_mode(2),
            )
            .await
            .context("AMQP publish")?;
        match tokio::time::timeout(Duration::from_secs(10), answers.next()).await {
            Ok(Some(Ok(_))) => {}
            _ => anyhow::bail!("AMQP round trip: no answer in 10 s"),
        }
        if i > 0 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    answering.abort();
    let _ = channel
        .queue_delete(requests.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "OK".into()).await;
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}
