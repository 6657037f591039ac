//! A follow-up that names a queue its tenant's broker lacks ([`CanvasError::QueueNotFound`]):
//! what its sender reads — `QueueNotFound: the callback math.add names queue 'work-b', which
//! does not exist in tenant a's broker` — and how whoever waits on the follow-up itself is
//! answered (the failure stored under its pre-assigned id) and the worker's log told.

use super::{Shared, store};
use crate::canvas::CanvasError;
use crate::protocol::TaskMessage;
use crate::results::{ExceptionInfo, ResultMeta};

/// A follow-up a task publishes, as the sender's error names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FollowUp {
    /// A `link` signature, run with the task's result.
    Callback,
    /// The chain's next step.
    ChainStep,
    /// A chord's body, published by the header member that completes it.
    ChordBody,
    /// A `link_error` signature, run with a failed task's id.
    Errback,
}

impl std::fmt::Display for FollowUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FollowUp::Callback => "callback",
            FollowUp::ChainStep => "next chain step",
            FollowUp::ChordBody => "chord body",
            FollowUp::Errback => "errback",
        })
    }
}

/// A follow-up (task `task`, pre-assigned id `task_id`) that names `queue`, which does not
/// exist in its tenant's broker ([`CanvasError::QueueNotFound`]).
pub(super) struct MissingQueue<'e> {
    pub(super) follow_up: FollowUp,
    pub(super) task: &'e str,
    pub(super) task_id: &'e str,
    pub(super) queue: &'e str,
}

impl MissingQueue<'_> {
    /// What the sender reads, e.g. `the callback math.add names queue 'work-b', which does
    /// not exist in tenant a's broker`.
    pub(super) fn text(&self, tenant: &str) -> String {
        format!(
            "the {} {} names queue '{}', which does not exist in tenant {tenant}'s broker",
            self.follow_up, self.task, self.queue
        )
    }

    /// The exception stored for it: `QueueNotFound`.
    pub(super) fn exception(&self, tenant: &str) -> ExceptionInfo {
        ExceptionInfo::new("QueueNotFound", "wasmq.exceptions", self.text(tenant))
    }

    /// Logs it (at error level, with the publishing task's id) and stores the exception
    /// under the follow-up's own id, child of `parent_id`, so whoever waits on it is
    /// answered. Returns the exception.
    pub(super) async fn fail(
        &self,
        shared: &Shared,
        message: &TaskMessage,
        parent_id: &str,
    ) -> Result<ExceptionInfo, CanvasError> {
        let tenant = shared.options.tenant_name();
        tracing::error!(
            task_id = %message.id,
            tenant,
            follow_up_id = %self.task_id,
            queue = %self.queue,
            "a follow-up cannot be published: {}",
            self.text(tenant)
        );
        let exception = self.exception(tenant);
        let mut failed = ResultMeta::failure(self.task_id, &exception);
        failed.parent_id = Some(parent_id.to_owned());
        failed.worker = Some(shared.options.node_name.clone());
        store(shared, message, &failed).await?;
        Ok(exception)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn a_missing_queue_names_the_follow_up_the_queue_and_the_tenant() {
        let missing = |follow_up| MissingQueue {
            follow_up,
            task: "math.add",
            task_id: "1",
            queue: "work-b",
        };
        assert_eq!(
            missing(FollowUp::Callback).text("a"),
            "the callback math.add names queue 'work-b', which does not exist in tenant a's broker"
        );
        let exception = missing(FollowUp::ChordBody).exception("acme");
        assert_eq!(exception.exc_type, "QueueNotFound");
        assert_eq!(
            exception.exc_message,
            [Value::from(
                "the chord body math.add names queue 'work-b', which does not exist in tenant acme's broker"
            )]
        );
        assert!(
            missing(FollowUp::ChainStep)
                .text("a")
                .starts_with("the next chain step math.add")
        );
        assert!(
            missing(FollowUp::Errback)
                .text("a")
                .starts_with("the errback")
        );
    }
}
