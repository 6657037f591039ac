//! `wasmq worker --config` with `[tenants.<id>]` tables: one worker per tenant in this
//! process — each with its own broker connection (vhost or file), result backend, queues,
//! plugin folder, prefetch window, revoked set and grants — sharing the sandbox engine, the
//! artifact cache and the task slots, which a [`SlotArbiter`] hands out fairly. One status
//! file reports every tenant.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::exit::Failure;
use super::process::{default_state_file, shutdown_signal};
use crate::broker::amqp::AmqpOptions;
use crate::config::WorkerConfig;
use crate::engine::{Sandbox, TenantLimits};
use crate::fair::{SlotArbiter, TenantShare};
use crate::results::ResultBackend;
use crate::tenancy::TenantConfig;
use crate::worker::{GrantsFor, StatusView, TenantOptions, Worker, write_status_file};

/// The result backend of `tenant`, under its key prefix; rpc replies published as the
/// tenant's (see [`crate::results::rpc::RpcResultBackend::for_tenant`]).
fn backend(tenant: &TenantConfig, expires: Duration) -> Result<Arc<dyn ResultBackend>, Failure> {
    let bad = |e: crate::results::ResultError| {
        Failure::bad_input(format!("tenant {:?}: {e:#}", tenant.name))
    };
    if crate::results::rpc::is_rpc_url(&tenant.result_backend) {
        // Replies are `mandatory`: one to a queue its vhost lacks is logged, not lost.
        let rpc = crate::results::rpc::RpcResultBackend::over_broker(
            &tenant.result_backend,
            &tenant.broker,
        )
        .map_err(bad)?
        .for_tenant(&tenant.name);
        return Ok(Arc::new(rpc));
    }
    match &tenant.result_prefix {
        Some(prefix) => Ok(Arc::new(
            crate::results::redis::RedisResultBackend::new(&tenant.result_backend, expires)
                .map_err(bad)?
                .with_key_prefix(prefix),
        )),
        None => {
            crate::results::connect(&tenant.result_backend, expires, &tenant.broker).map_err(bad)
        }
    }
}

/// Creates a folder the configuration names if it is missing (a tenant's plugin folder, the
/// host side of a folder it may grant). The path is used whole, as configured: nothing is
/// joined to it.
fn ensure_folder(tenant: &str, what: &str, path: &Path) -> Result<(), Failure> {
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(|e| {
            Failure::bad_input(format!(
                "tenant {tenant:?}: cannot create its {what} {}: {e}",
                path.display()
            ))
        })?;
        tracing::info!(tenant, folder = %path.display(), "created its {what}");
    }
    Ok(())
}

/// Runs one worker per tenant until the first SIGINT or SIGTERM.
pub(super) async fn run(
    config: WorkerConfig,
    sandbox: Arc<Sandbox>,
    status_file: &Option<PathBuf>,
    state_file: &Option<PathBuf>,
    metrics: Option<std::net::SocketAddr>,
) -> Result<(), Failure> {
    let shares = config
        .tenants
        .iter()
        .map(|tenant| TenantShare {
            name: tenant.name.clone(),
            weight: tenant.weight,
            max_concurrency: tenant.max_concurrency,
            reserved: tenant.reserved,
            memory_budget: tenant.memory_budget,
        })
        .collect();
    let slots = SlotArbiter::new(config.worker.concurrency, shares)
        .map_err(|e| Failure::bad_input(format!("tenants: {e}")))?;
    let amqp = AmqpOptions {
        queue_max_priority: config.queue_max_priority,
    };

    let mut workers = Vec::new();
    let mut watchers = Vec::new();
    for (seat, tenant) in config.tenants.iter().enumerate() {
        if tenant.plugin_store.is_none() {
            ensure_folder(&tenant.name, "plugin folder", &tenant.plugins)?;
        }
        for dir in tenant.host_dirs() {
            ensure_folder(&tenant.name, "folder", &dir.host)?;
        }
        let broker = crate::broker::scheduled::connect_prefixed(
            &tenant.broker,
            tenant.scheduler.as_deref(),
            &tenant.scheduler_prefix(),
            amqp,
        )
        .map_err(|e| Failure::bad_input(format!("tenant {:?}: {e:#}", tenant.name)))?;
        let backend = backend(tenant, config.result_expires)?;
        let source = super::plugin_source::serve_plugins(
            Arc::clone(&sandbox),
            &tenant.plugins,
            tenant.plugin_store.as_deref(),
            &tenant.trust,
            &config.worker.node_name,
            &broker,
        )
        .instrument(tracing::error_span!("tenant", tenant = %tenant.name))
        .await?;
        let registry = Arc::clone(&source.registry);
        for (task, file) in registry.snapshot().tasks() {
            tracing::info!(tenant = %tenant.name, task, plugin = %file.display(), "registered");
        }
        watchers.push(source);
        let mut options = config.worker.clone();
        options.queues.clone_from(&tenant.queues);
        options.concurrency = tenant.max_concurrency;
        options.prefetch = Some(tenant.prefetch);
        options.status_file = None;
        options.state_file = Some(match state_file {
            // One file per tenant: each has its own revoked set.
            Some(file) => file.with_extension(format!("{}.json", tenant.name)),
            None => default_state_file(&options.node_name, Some(&tenant.name)),
        });
        let grants = tenant.clone();
        options.tenant = Some(TenantOptions {
            name: tenant.name.clone(),
            limits: Some(TenantLimits {
                defaults: tenant.limits,
                ceiling: tenant.ceiling,
            }),
            grants: GrantsFor::new(move |task| grants.grants_for(task)),
        });
        tracing::info!(
            tenant = %tenant.name,
            weight = tenant.weight,
            max_concurrency = tenant.max_concurrency,
            reserved = tenant.reserved,
            prefetch = tenant.prefetch,
            secrets = ?tenant.secret_names().collect::<Vec<_>>(),
            "tenant configured"
        );
        workers.push(Worker::sharing(
            broker,
            backend,
            registry,
            options,
            slots.clone(),
            seat,
        ));
    }

    let views: Vec<StatusView> = workers.iter().map(Worker::status_view).collect();
    let status = status_file.clone().map(|path| {
        let views = views.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                write_status_file(&path, &combined_status(&views));
            }
        })
    });

    let endpoint = {
        let views = views.clone();
        super::metrics::serve(metrics, config.worker.metrics.clone(), move || {
            let status = combined_status(&views);
            (status["consuming"] == true, status)
        })
        .await?
    };

    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Every log line of a tenant's worker carries `tenant{tenant=…}` (a JSON line, `"tenant": …`).
    let runs = workers
        .into_iter()
        .zip(&config.tenants)
        .map(|(worker, tenant)| {
            let mut stopped = stopped.clone();
            let span = tracing::error_span!("tenant", tenant = %tenant.name);
            tokio::spawn(
                async move {
                    worker
                        .run(async move { drop(stopped.wait_for(|stop| *stop).await) })
                        .await
                }
                .instrument(span),
            )
        });
    let runs: Vec<_> = runs.collect();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let mut failed = Vec::new();
    for (run, tenant) in runs.into_iter().zip(&config.tenants) {
        match run.await {
            Ok(Ok(_stats)) => {}
            Ok(Err(error)) => {
                tracing::error!(tenant = %tenant.name, error = &error as &dyn std::error::Error, "the tenant's worker stopped");
                failed.push(format!("{}: {error:#}", tenant.name));
            }
            Err(panic) => failed.push(format!("{}: {panic}", tenant.name)),
        }
    }
    if let Some(status) = status {
        status.abort();
    }
    if let Some(endpoint) = endpoint {
        endpoint.abort();
    }
    for source in watchers {
        source.stop().await;
    }
    if let Some(path) = status_file {
        write_status_file(path, &combined_status(&views));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::internal(anyhow::anyhow!(
            "tenants stopped with errors: {}",
            failed.join("; ")
        )))
    }
}

/// One status for all tenants: consuming only when every tenant consumes, with each
/// tenant's own status under `tenants`.
fn combined_status(views: &[StatusView]) -> serde_json::Value {
    let tenants: Vec<serde_json::Value> = views.iter().map(StatusView::snapshot).collect();
    let all = |key: &str| {
        tenants
            .iter()
            .all(|t| t[key] == serde_json::Value::Bool(true))
    };
    let consuming = all("consuming");
    let state = if tenants.iter().all(|t| t["state"] == "stopped") {
        "stopped"
    } else if consuming {
        "consuming"
    } else {
        "reconnecting"
    };
    let sum = |key: &str| tenants.iter().filter_map(|t| t[key].as_u64()).sum::<u64>();
    serde_json::json!({
        "node": tenants.first().map(|t| t["node"].clone()),
        "pid": std::process::id(),
        "state": state,
        "consuming": consuming,
        "updated": crate::protocol::format_time(&chrono::Utc::now()),
        "running": sum("running"),
        "queued": sum("queued"),
        "finished": sum("finished"),
        "tenants": tenants,
    })
}
