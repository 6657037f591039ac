//! Starting a workflow from a client: `apply(&client)` on a signature, chain, group or
//! chord validates and freezes it (every id assigned before anything is published, so its
//! result can be waited on), publishes it through the canvas's dispatch with the client's
//! routes, and returns the handle on its result.

use super::{AsyncResult, Client, GroupResult};
use crate::canvas::{CanvasError, Chain, Chord, Declaring, Dispatch, Group, Kind, Signature};

impl Client {
    /// The dispatch that publishes a workflow this client starts: its broker, backend,
    /// routes and default queue; every task it publishes is a root.
    async fn dispatch(&self) -> Result<Dispatch<'_>, CanvasError> {
        self.backend.prepare().await?;
        Ok(Dispatch {
            broker: self.broker.as_ref(),
            backend: self.backend.as_ref(),
            routes: &self.routes,
            queue: self.default_queue.clone(),
            declaring: Declaring::Any,
            root_id: None,
            parent_id: None,
            reply_to: self.backend.reply_to(),
            origin: Some(self.origin.clone()),
            trace: None,
        })
    }

    /// Validates, freezes and publishes `sig`; the result is the workflow's result.
    async fn apply_frozen(&self, mut sig: Signature) -> Result<AsyncResult, CanvasError> {
        sig.validate()?;
        sig.freeze()?;
        let id = sig
            .result_id()
            .ok_or_else(|| sig.malformed("no result id"))?;
        self.dispatch().await?.apply(&sig, None, Vec::new()).await?;
        Ok(self.result(&id))
    }
}

impl Signature {
    /// Sends this signature as one task (after freezing it) and returns its result.
    ///
    /// # Errors
    /// When it is malformed or cannot be published.
    pub async fn apply(&self, client: &Client) -> Result<AsyncResult, CanvasError> {
        client.apply_frozen(self.clone()).await
    }
}

impl Chain {
    /// Starts the chain; the result is the last step's.
    ///
    /// # Errors
    /// When it is empty or malformed, or cannot be published.
    pub async fn apply(&self, client: &Client) -> Result<AsyncResult, CanvasError> {
        client.apply_frozen(self.0.clone()).await
    }
}

impl Group {
    /// Sends every member; the result holds each member's result in order.
    ///
    /// # Errors
    /// When a member is malformed or cannot be published.
    pub async fn apply(&self, client: &Client) -> Result<GroupResult, CanvasError> {
        let mut sig = self.0.clone();
        sig.validate()?;
        sig.freeze()?;
        let Kind::Group(members) = sig.kind()? else {
            return Err(sig.malformed("not a group"));
        };
        let id = sig
            .task_id()
            .ok_or_else(|| sig.malformed("no group id"))?
            .to_owned();
        let results = members
            .iter()
            .map(|m| {
                m.result_id()
                    .map(|id| client.result(&id))
                    .ok_or_else(|| m.malformed("no result id"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        client
            .dispatch()
            .await?
            .apply(&sig, None, Vec::new())
            .await?;
        Ok(GroupResult { id, results })
    }
}

impl Chord {
    /// Registers the chord's size with the backend, sends the header; the result is the
    /// body's.
    ///
    /// # Errors
    /// [`CanvasError::Backend`] with `ResultError::ChordsUnsupported` on the rpc backend;
    /// otherwise when malformed or unpublishable.
    pub async fn apply(&self, client: &Client) -> Result<AsyncResult, CanvasError> {
        client.apply_frozen(self.0.clone()).await
    }
}
