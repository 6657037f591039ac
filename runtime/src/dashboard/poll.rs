//! What the dashboard asks for rather than hears: queue lengths (a passive declare on
//! RabbitMQ, a count in the embedded file), dead letters (on RabbitMQ a look that takes
//! each message and gives it back, so only of the queues named to the dashboard; on the
//! embedded broker of every queue in the file), and — where the broker carries remote
//! control — Celery's `inspect stats`, `active_queues` and `active`, answered by wasmq and
//! Python workers alike. Like Flower, it also broadcasts `enable_events` (unless told not
//! to), so workers started without `-E` send task events too.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Map;

use super::state::State;
use super::{DashboardOptions, now};
use crate::broker::{Broker, BrokerError, ControlBroadcast};
use crate::protocol::ControlCommand;

/// How many dead letters of each queue are looked at.
const DEAD_LETTERS_SHOWN: usize = 50;

/// Polls until the task is aborted: queue lengths every `refresh`, the rest every third
/// round (dead letters are a look at every message; inspect is a broadcast every worker
/// answers).
pub(super) async fn run(
    broker: Arc<dyn Broker>,
    state: Arc<Mutex<State>>,
    options: DashboardOptions,
) {
    let mut remote_control = true;
    for round in 0_u64.. {
        let queues = {
            let mut state = lock(&state);
            state.prune(now());
            state.queue_names()
        };
        let (more, error) = known_queues(broker.as_ref()).await;
        record(&state, "queue list", error);
        let queues = {
            let mut state = lock(&state);
            for queue in &more {
                state.add_queue(queue);
            }
            if more.is_empty() {
                queues
            } else {
                state.queue_names()
            }
        };
        let mut failure = None;
        for queue in &queues {
            match broker.queue_length(queue).await {
                Ok(length) => lock(&state).set_length(queue, length),
                Err(error) => failure = Some(format!("{queue}: {error}")),
            }
        }
        record(&state, "queue lengths", failure);
        if round % 3 == 0 {
            // On RabbitMQ a look at dead letters takes each message and gives it back: only
            // the queues named to the dashboard are looked at, not every queue a worker
            // consumes. The embedded broker's list is a read of its own table.
            let mut named = options.queues.clone();
            named.extend(more.iter().filter(|q| !options.queues.contains(q)).cloned());
            let mut failure = None;
            for queue in &named {
                if let Err(error) = dead_letters(broker.as_ref(), &state, queue).await {
                    failure = Some(format!("{queue}: {error}"));
                }
            }
            record(&state, "dead letters", failure);
            if remote_control {
                remote_control = inspect(broker.as_ref(), &state, &options).await;
            }
        }
        tokio::time::sleep(options.refresh).await;
    }
}

async fn known_queues(broker: &dyn Broker) -> (Vec<String>, Option<String>) {
    match broker.known_queues().await {
        Ok(queues) => (queues, None),
        Err(error) => (Vec::new(), Some(error.to_string())),
    }
}

async fn dead_letters(
    broker: &dyn Broker,
    state: &Mutex<State>,
    queue: &str,
) -> Result<(), BrokerError> {
    // Looking declares the queue on RabbitMQ: only queues that exist are looked at.
    if !broker.queue_exists(queue).await? {
        return Ok(());
    }
    let letters = broker.dead_letters(queue, DEAD_LETTERS_SHOWN).await?;
    lock(state).set_dead_letters(queue, letters);
    Ok(())
}

/// One round of inspect broadcasts (and `enable_events`); false when the broker carries no
/// remote control, so the poller stops asking.
async fn inspect(broker: &dyn Broker, state: &Mutex<State>, options: &DashboardOptions) -> bool {
    if options.enable_events {
        let cast = ControlBroadcast {
            command: ControlCommand::new("enable_events".to_owned(), Map::new(), None),
            reply: false,
            timeout: Duration::from_millis(1),
            limit: None,
        };
        if let Err(BrokerError::NoRemoteControl(_)) = broker.broadcast_control(&cast).await {
            record(state, "inspect", None);
            return false;
        }
    }
    let ask = |method: &'static str| {
        let broadcast = ControlBroadcast {
            command: ControlCommand::new(method.to_owned(), Map::new(), None),
            reply: true,
            timeout: options.inspect_timeout,
            limit: None,
        };
        async move { (method, broker.broadcast_control(&broadcast).await) }
    };
    let answers =
        futures_util::future::join_all([ask("stats"), ask("active_queues"), ask("active")]).await;
    let mut failure = None;
    for (method, answer) in answers {
        match answer {
            Ok(replies) => {
                let at = now();
                let mut state = lock(state);
                for reply in replies {
                    state.apply_inspect(method, &reply.node, &reply.reply, at);
                }
            }
            Err(BrokerError::NoRemoteControl(_)) => return false,
            Err(error) => failure = Some(format!("{method}: {error}")),
        }
    }
    record(state, "inspect", failure);
    true
}

fn record(state: &Mutex<State>, source: &str, error: Option<String>) {
    lock(state).set_error(source, error);
}

/// The state, even after a panic elsewhere poisoned its lock (it stays consistent: every
/// update is a few field writes).
pub(super) fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
