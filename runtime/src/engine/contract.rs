//! The contract versions a worker serves: a plugin built for the current WIT package
//! (`wasmq:task@0.3.0`) or for the previous one (`@0.2.0`) is loaded, described and run
//! through one interface, its values converted to the current types. A plugin built for
//! any other version is refused when it is loaded, naming the versions served.
//!
//! The previous version lacks what 0.3.0 added, and its values convert by leaving those
//! out: a 0.2.0 plugin is told only the ids and the retry count of its call, declares no
//! soft limit and stores its results, fails without the exception's arguments, retries
//! with the same arguments, and never requeues a message it rejects.

use wasmtime::Store;
use wasmtime::component::{InstancePre, Linker};

use super::bindings::{self, types as wit, v0_2};
use super::call::CallState;

/// The versions served, newest first.
pub(crate) const SERVED: &str = "wasmq:task@0.3.0 or @0.2.0";

/// A plugin component, linked and ready to instantiate, by the version it was built for.
#[derive(Clone)]
pub(crate) enum PluginPre {
    /// `wasmq:task@0.3.0`.
    Current(bindings::TaskPluginPre<CallState>),
    /// `wasmq:task@0.2.0`.
    V0_2(v0_2::TaskPluginPre<CallState>),
}

/// One instance of a plugin, for one call.
pub(crate) enum PluginInstance {
    /// `wasmq:task@0.3.0`.
    Current(bindings::TaskPlugin),
    /// `wasmq:task@0.2.0`.
    V0_2(v0_2::TaskPlugin),
}

/// Adds the host side of every served version to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    bindings::TaskPlugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)?;
    v0_2::TaskPlugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
}

impl PluginPre {
    /// Recognizes the version `pre`'s component was built for.
    ///
    /// # Errors
    /// Why it fits no served version (the current version's complaint).
    pub(crate) fn new(pre: InstancePre<CallState>) -> wasmtime::Result<Self> {
        match bindings::TaskPluginPre::new(pre.clone()) {
            Ok(current) => Ok(Self::Current(current)),
            Err(error) => v0_2::TaskPluginPre::new(pre)
                .map(Self::V0_2)
                .map_err(|_| error),
        }
    }

    /// The WIT package version the plugin was built for.
    pub(crate) fn version(&self) -> &'static str {
        match self {
            Self::Current(_) => "0.3.0",
            Self::V0_2(_) => "0.2.0",
        }
    }

    /// A fresh instance in `store`.
    pub(crate) async fn instantiate(
        &self,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<PluginInstance> {
        Ok(match self {
            Self::Current(pre) => PluginInstance::Current(pre.instantiate_async(store).await?),
            Self::V0_2(pre) => PluginInstance::V0_2(pre.instantiate_async(store).await?),
        })
    }
}

impl PluginInstance {
    /// The tasks the plugin offers.
    pub(crate) async fn describe(
        &self,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Vec<wit::TaskInfo>> {
        match self {
            Self::Current(plugin) => plugin.wasmq_task_plugin().call_describe(store).await,
            Self::V0_2(plugin) => Ok(plugin
                .wasmq_task_plugin()
                .call_describe(store)
                .await?
                .into_iter()
                .map(task_info)
                .collect()),
        }
    }

    /// Runs one task.
    pub(crate) async fn run(
        &self,
        store: &mut Store<CallState>,
        invocation: &wit::Invocation,
        args_json: &str,
        kwargs_json: &str,
    ) -> wasmtime::Result<Result<String, wit::TaskError>> {
        match self {
            Self::Current(plugin) => {
                plugin
                    .wasmq_task_plugin()
                    .call_run(store, invocation, args_json, kwargs_json)
                    .await
            }
            Self::V0_2(plugin) => {
                // The request fields 0.3.0 added have no place in 0.2.0's record.
                let invocation = v0_2::types::Invocation {
                    id: invocation.id.clone(),
                    task: invocation.task.clone(),
                    retries: invocation.retries,
                    root_id: invocation.root_id.clone(),
                    parent_id: invocation.parent_id.clone(),
                    group_id: invocation.group_id.clone(),
                };
                let ran = plugin
                    .wasmq_task_plugin()
                    .call_run(store, &invocation, args_json, kwargs_json)
                    .await?;
                Ok(ran.map_err(task_error))
            }
        }
    }
}

fn task_info(info: v0_2::types::TaskInfo) -> wit::TaskInfo {
    let (limits, policy) = (info.limits, info.policy);
    wit::TaskInfo {
        name: info.name,
        doc: info.doc,
        params: info.params,
        limits: wit::Limits {
            fuel: limits.fuel,
            memory_bytes: limits.memory_bytes,
            timeout_ms: limits.timeout_ms,
            soft_timeout_ms: None,
        },
        policy: wit::TaskPolicy {
            autoretry_for: policy.autoretry_for,
            max_retries: policy.max_retries,
            default_retry_delay_ms: policy.default_retry_delay_ms,
            retry_backoff_ms: policy.retry_backoff_ms,
            retry_backoff_max_ms: policy.retry_backoff_max_ms,
            retry_jitter: policy.retry_jitter,
            rate_limit: policy.rate_limit,
        },
        ignore_result: false,
    }
}

fn task_error(error: v0_2::types::TaskError) -> wit::TaskError {
    use v0_2::types::TaskError as Old;
    match error {
        Old::Failed(failure) => wit::TaskError::Failed(wit::Failure {
            kind: failure.kind,
            message: failure.message,
            args_json: None,
        }),
        Old::Retry(retry) => wit::TaskError::Retry(wit::RetryRequest {
            countdown_ms: retry.countdown_ms,
            reason: retry.reason,
            exc: None,
            args_json: None,
            kwargs_json: None,
            max_retries: None,
            expires_ms: None,
        }),
        Old::Reject(reason) => wit::TaskError::Reject(wit::Rejection {
            reason,
            requeue: false,
        }),
        Old::InvalidArguments(message) => wit::TaskError::InvalidArguments(message),
    }
}
