//! Carrying out a decision: store the result, continue the workflow, publish what must be
//! published (a retry, a deferred copy), then settle the message — in that order, so a
//! message is acknowledged only once everything it caused is safely stored or published
//! (late acks). When any step fails the message is released instead: it runs again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;
use serde_json::Value;

use super::Shared;
use super::continuation;
use super::decision::{Decision, NextAttempt, Settlement};
use super::hooks::Ran;
use crate::broker::Delivery;
use crate::protocol::{Envelope, TaskMessage};
use crate::results::{ReplyTo, ResultMeta, TaskState};

/// Stores the decision's meta (unless the message asked not to), continues the workflow,
/// then settles the message as decided. `message` is none for a message that could not be
/// decoded.
pub(super) async fn finish(
    shared: &Arc<Shared>,
    delivery: Delivery,
    message: Option<&TaskMessage>,
    decision: Decision,
) {
    finish_ran(shared, delivery, message, decision, None).await;
}

/// [`finish`] for a task that went through its sandbox call (`ran`), which its observers
/// are told.
pub(super) async fn finish_ran(
    shared: &Arc<Shared>,
    delivery: Delivery,
    message: Option<&TaskMessage>,
    decision: Decision,
    ran: Option<Ran>,
) {
    if let Some(meta) = decision.meta
        && !store_and_continue(shared, &delivery, message, meta, &decision.settlement, ran).await
    {
        release(shared, delivery).await;
        return;
    }
    let republished = match (&decision.settlement, message) {
        (Settlement::RetryLater { delay, next }, Some(message)) => Some((
            retry_message(message, *delay, next).encode(),
            *delay,
            "retry",
        )),
        (Settlement::Defer { delay }, _) => {
            shared.stats.deferred.fetch_add(1, Ordering::Relaxed);
            Some((delivery.envelope.clone(), *delay, "deferred message"))
        }
        _ => None,
    };
    // Back to the queue the message came from: one this worker consumes (a tenant's own,
    // which it may declare), so a retry needs none of a follow-up's existence check.
    if let Some((envelope, delay, what)) = republished
        && let Err(error) = shared
            .broker
            .publish(&delivery.queue, &envelope, Some(delay))
            .await
    {
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            "cannot publish the {what}; releasing the message"
        );
        release(shared, delivery).await;
        return;
    }
    settle(shared, delivery, &decision.settlement).await;
}

/// The next attempt of `message`, `delay` from now: the same message (custom headers,
/// priority and `ignore_result` included, as Celery's retry keeps them) with `retries + 1`,
/// and the new arguments and expiry the task asked for.
fn retry_message(
    message: &TaskMessage,
    delay: std::time::Duration,
    next: &NextAttempt,
) -> TaskMessage {
    let mut retry = message.clone();
    retry.retries += 1;
    // A new message: wasmq's bookkeeping of the earlier one (its delivery count, which
    // counts towards `max_deliveries`) does not carry over.
    retry
        .extra_headers
        .retain(|name, _| !name.starts_with("x-wasmq-"));
    let now = Utc::now();
    let after = |wait| chrono::Duration::from_std(wait).ok().map(|d| now + d);
    retry.eta = after(delay);
    retry.parent_id = Some(message.id.clone());
    if let Some(args) = &next.args {
        retry.args.clone_from(args);
    }
    if let Some(kwargs) = &next.kwargs {
        retry.kwargs.clone_from(kwargs);
    }
    if let Some(expires) = next.expires {
        retry.expires = after(expires);
    }
    retry
}

/// Stores `meta` with what the message says about it, publishing the workflow's next steps
/// before (on success) or after (chord counting, failure propagation) storing it. False
/// when the message must be released.
async fn store_and_continue(
    shared: &Arc<Shared>,
    delivery: &Delivery,
    message: Option<&TaskMessage>,
    mut meta: ResultMeta,
    settlement: &Settlement,
    ran: Option<Ran>,
) -> bool {
    if let Some(message) = message {
        meta.parent_id.clone_from(&message.parent_id);
        meta.group_id.clone_from(&message.group);
    }
    meta.worker = Some(shared.options.node_name.clone());
    if let Some(message) = message
        && !continuation::before_store(shared, &delivery.queue, message, &mut meta).await
    {
        return false;
    }
    let ignore_result = message.is_some_and(TaskMessage::ignores_result);
    let keep = !ignore_result || !matches!(settlement, Settlement::Ack);
    // An undecodable message still says where its sender listens.
    let reply = message.map_or_else(|| reply_of_envelope(&delivery.envelope), reply_of);
    if keep && !store(shared, &meta, reply.as_ref()).await {
        return false;
    }
    if let Some(message) = message
        && !continuation::after_store(shared, &delivery.queue, message, &meta).await
    {
        return false;
    }
    let stats = &shared.stats;
    let counter = match meta.status {
        TaskState::Success => &stats.succeeded,
        TaskState::Retry => &stats.retried,
        TaskState::Revoked => &stats.revoked,
        _ => &stats.failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    super::observe::finished(shared, message, delivery, &meta, ran);
    true
}

/// True when settling `message` as `decision` says needs no network round trip: no result
/// to store, nothing to publish, only an ack (which the broker batches).
pub(super) fn settles_locally(message: &TaskMessage, decision: &Decision) -> bool {
    let embed = &message.embed;
    message.ignores_result()
        && matches!(decision.settlement, Settlement::Ack)
        && embed.callbacks.as_ref().is_none_or(Vec::is_empty)
        && embed.errbacks.as_ref().is_none_or(Vec::is_empty)
        && embed.chain.as_ref().is_none_or(Vec::is_empty)
        && embed.chord.is_none()
}

/// Where an rpc result goes: the message's `reply_to`, correlated by its `correlation_id`
/// (or the task id).
pub(super) fn reply_of(message: &TaskMessage) -> Option<ReplyTo> {
    message
        .reply_to
        .as_ref()
        .filter(|q| !q.is_empty())
        .map(|queue| ReplyTo {
            queue: queue.clone(),
            correlation_id: message
                .correlation_id
                .clone()
                .unwrap_or_else(|| message.id.clone()),
        })
}

/// [`reply_of`] for a message that could not be decoded.
fn reply_of_envelope(envelope: &Envelope) -> Option<ReplyTo> {
    let id = envelope.headers.get("id").and_then(Value::as_str);
    let properties = &envelope.properties;
    let queue = properties.reply_to.as_ref().filter(|q| !q.is_empty())?;
    Some(ReplyTo {
        queue: queue.clone(),
        correlation_id: properties
            .correlation_id
            .clone()
            .or_else(|| id.map(str::to_owned))?,
    })
}

/// Stores `meta`; false (logged) when the backend failed.
pub(super) async fn store(shared: &Shared, meta: &ResultMeta, reply: Option<&ReplyTo>) -> bool {
    match shared.backend.store(meta, reply).await {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(error = &error as &dyn std::error::Error, task_id = %meta.task_id, "cannot store the result; the message will be redelivered");
            false
        }
    }
}

async fn settle(shared: &Shared, delivery: Delivery, settlement: &Settlement) {
    if !matches!(settlement, Settlement::Release) {
        shared.stats.settled.fetch_add(1, Ordering::Relaxed);
    }
    let result = match settlement {
        Settlement::Ack | Settlement::RetryLater { .. } | Settlement::Defer { .. } => {
            delivery.ack().await
        }
        Settlement::DeadLetter { reason } => {
            shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            super::observe::dead_lettered(shared, &delivery.queue, reason);
            delivery.dead_letter(reason).await
        }
        Settlement::Release => {
            release(shared, delivery).await;
            return;
        }
    };
    if let Err(error) = result {
        tracing::error!(
            error = &error as &dyn std::error::Error,
            "cannot settle a message; it will be redelivered"
        );
    }
}

/// Gives the message back for redelivery.
pub(super) async fn release(shared: &Shared, delivery: Delivery) {
    shared.stats.released.fetch_add(1, Ordering::Relaxed);
    shared.stats.settled.fetch_add(1, Ordering::Relaxed);
    if let Err(error) = delivery.release().await {
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            "cannot release a message; it returns when its lease expires"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Map, json};

    use super::*;

    #[test]
    fn a_retry_keeps_the_message_and_changes_what_the_task_asked() {
        let mut message = TaskMessage::new("t.add", vec![json!(1)], Map::new());
        message.priority = Some(7);
        message.ignore_result = Some(false);
        message
            .extra_headers
            .insert("x-test-header".into(), "test-value".into());
        // Delivered three times before it asked for a retry (its workers died twice).
        message
            .extra_headers
            .insert("x-wasmq-deliveries".into(), 3.into());
        let same = retry_message(&message, Duration::from_secs(1), &NextAttempt::default());
        assert!(
            !same.extra_headers.contains_key("x-wasmq-deliveries"),
            "the retry's deliveries are counted afresh"
        );
        assert_eq!(same.retries, 1);
        assert_eq!(same.args, message.args);
        assert_eq!(same.priority, Some(7));
        assert_eq!(same.ignore_result, Some(false));
        assert_eq!(same.custom_headers(), message.custom_headers());
        assert!(same.eta.is_some_and(|eta| eta > Utc::now()));

        let next = NextAttempt {
            args: Some(vec![json!(2), json!(3)]),
            kwargs: Some(json!({"label": "kept"}).as_object().unwrap().clone()),
            expires: Some(Duration::from_secs(60)),
        };
        let changed = retry_message(&message, Duration::ZERO, &next);
        assert_eq!(changed.args, [json!(2), json!(3)]);
        assert_eq!(Value::Object(changed.kwargs), json!({"label": "kept"}));
        let expires = changed.expires.unwrap();
        assert!(expires > Utc::now() + chrono::Duration::seconds(55));
        assert!(expires <= Utc::now() + chrono::Duration::seconds(60));
    }
}
