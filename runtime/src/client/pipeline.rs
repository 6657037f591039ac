//! Sending many tasks with a window of unconfirmed publishes: [`Pipeline`].
//!
//! [`Client::send_task`] waits for the broker's confirmation of each message before it
//! returns (on RabbitMQ, a persistent message is confirmed once on disk: ~0.7 ms here), so
//! one sender publishes at most a few thousand tasks a second. A pipeline keeps up to
//! `window` publishes unconfirmed, as RabbitMQ's own clients do with a confirm window: the
//! broker syncs them to disk together, and the sender waits only when the window is full.
//! Every id a pipeline hands back is confirmed.

use std::collections::VecDeque;

use serde_json::{Map, Value};

use super::{Client, SendError, SendOptions};
use crate::broker::Confirmation;

/// The confirm window [`Client::pipeline`] uses unless told otherwise: enough to keep
/// RabbitMQ's disk syncs batched, small enough that a refused message is reported soon.
pub const DEFAULT_CONFIRM_WINDOW: usize = 256;

/// Sends tasks with at most `window` of them awaiting the broker's confirmation; made by
/// [`Client::pipeline`].
///
/// ```no_run
/// # async fn example(client: wasmq::client::Client) -> Result<(), wasmq::client::SendError> {
/// let mut pipeline = client.pipeline(256);
/// for i in 0..10_000 {
///     let confirmed = pipeline
///         .send("math.add", vec![i.into(), 1.into()], Default::default(), Default::default())
///         .await?;
///     for id in confirmed {
///         println!("{id}");
///     }
/// }
/// for id in pipeline.finish().await? {
///     println!("{id}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Pipeline<'c> {
    client: &'c Client,
    window: usize,
    unconfirmed: VecDeque<(String, Confirmation)>,
}

impl<'c> Pipeline<'c> {
    pub(super) fn new(client: &'c Client, window: usize) -> Self {
        let window = window.max(1);
        Self {
            client,
            window,
            unconfirmed: VecDeque::with_capacity(window),
        }
    }

    /// Publishes `task` without waiting for its confirmation, unless the window is full:
    /// then the oldest unconfirmed publish is awaited first. Returns the ids confirmed by
    /// this call (none, or the oldest one), in the order they were sent.
    ///
    /// # Errors
    /// [`SendError`] when the message cannot be sent, or when the broker refused the oldest
    /// one (then the ids sent after it are still unconfirmed: see [`Pipeline::finish`]).
    pub async fn send(
        &mut self,
        task: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        options: SendOptions,
    ) -> Result<Option<String>, SendError> {
        let confirmed = if self.unconfirmed.len() >= self.window {
            Some(self.confirm_oldest().await?)
        } else {
            None
        };
        let (result, confirmation) = self.client.submit(task, args, kwargs, options).await?;
        self.unconfirmed.push_back((result.id, confirmation));
        Ok(confirmed)
    }

    /// How many publishes await their confirmation.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed.len()
    }

    /// Awaits the oldest unconfirmed publish and returns its id.
    async fn confirm_oldest(&mut self) -> Result<String, SendError> {
        let (id, confirmation) = self
            .unconfirmed
            .pop_front()
            .expect("a full window holds a publish");
        confirmation.await?;
        Ok(id)
    }

    /// Awaits every unconfirmed publish, oldest first, and returns their ids.
    ///
    /// # Errors
    /// [`SendError::Broker`] at the first one the broker refused; those after it are
    /// dropped unconfirmed (they may or may not have been taken).
    pub async fn finish(mut self) -> Result<Vec<String>, SendError> {
        let mut ids = Vec::with_capacity(self.unconfirmed.len());
        while !self.unconfirmed.is_empty() {
            ids.push(self.confirm_oldest().await?);
        }
        Ok(ids)
    }
}

impl Client {
    /// A [`Pipeline`] that sends tasks with up to `window` publishes awaiting the broker's
    /// confirmation ([`DEFAULT_CONFIRM_WINDOW`] is a good start).
    pub fn pipeline(&self, window: usize) -> Pipeline<'_> {
        Pipeline::new(self, window)
    }
}
