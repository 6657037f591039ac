//! `wasmq chaos`: runs the fault scenarios of `crate::chaos` against servers on this
//! machine and prints their table. Exit 0 when every scenario lost nothing and got nothing
//! wrong, 1 when one did (the table says which), 2 for a server that is not on this machine.

use std::time::Duration;

use super::exit::{ExitStatus, Failure};
use crate::bench::NotLocal;
use crate::chaos::{kill_workers, network, restarts, sqlite_race, table};

/// The scenarios, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Scenario {
    /// SIGKILL the worker during a drain on the embedded broker.
    KillEmbedded,
    /// SIGKILL the worker during a drain on RabbitMQ, results in Redis.
    KillRabbitmq,
    /// Two workers and a publisher on one SQLite file, all under kill -9.
    SqliteRace,
    /// Latency, a stall, a reset and a half-open link between a worker and RabbitMQ,
    /// through a fault-injecting proxy.
    Network,
    /// RabbitMQ restarted (`rabbitmqctl stop_app`/`start_app`: every client of this
    /// machine's RabbitMQ is disconnected), then a Redis of the run's own that stores the
    /// results, during a drain.
    Restarts,
}

#[derive(Debug, clap::Args)]
pub(super) struct ChaosArgs {
    /// Only these scenarios, comma-separated. Default: all.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// Tasks each scenario sends.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Processes each scenario kills.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Each worker's task slots.
    #[arg(long, short = 'c', default_value_t = 4)]
    concurrency: usize,
    /// RabbitMQ on this machine.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker: String,
    /// Redis on this machine, for the RabbitMQ scenarios' results.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
    /// The AMQP heartbeat (seconds) the network scenario's worker asks for.
    #[arg(long, default_value_t = 2)]
    heartbeat: u16,
    /// How long a scenario waits with no task finishing before it counts the rest as lost.
    #[arg(long, default_value = "60s")]
    stall: humantime::Duration,
}

/// Runs the chosen scenarios one after another and prints the table.
pub(super) async fn run(args: ChaosArgs) -> Result<(), Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::internal(anyhow::anyhow!("cannot find the wasmq executable: {e}")))?;
    let scenarios = if args.only.is_empty() {
        vec![
            Scenario::KillEmbedded,
            Scenario::KillRabbitmq,
            Scenario::SqliteRace,
            Scenario::Network,
            Scenario::Restarts,
        ]
    } else {
        args.only.clone()
    };
    let stall: Duration = args.stall.into();
    let mut tallies = Vec::new();
    for scenario in scenarios {
        let dir = tempfile::tempdir().map_err(|e| {
            Failure::internal(anyhow::anyhow!("cannot make a folder for the run: {e}"))
        })?;
        let db = format!("sqlite://{}", dir.path().join("chaos.db").display());
        eprintln!("running {scenario:?}…");
        let tally = match scenario {
            Scenario::KillEmbedded | Scenario::KillRabbitmq => {
                let (broker, results) = if scenario == Scenario::KillEmbedded {
                    (db.clone(), db)
                } else {
                    (args.broker.clone(), args.redis.clone())
                };
                kill_workers::run(
                    &exe,
                    dir.path(),
                    &kill_workers::KillWorkers {
                        broker,
                        results,
                        tasks: args.tasks,
                        kills: args.kills,
                        concurrency: args.concurrency,
                        stall,
                    },
                )
                .await
            }
            Scenario::Network => {
                network::run(
                    &exe,
                    dir.path(),
                    &network::NetworkFaults {
                        broker: args.broker.clone(),
                        results: args.redis.clone(),
                        tasks: args.tasks,
                        concurrency: args.concurrency,
                        heartbeat: args.heartbeat,
                        stall,
                    },
                )
                .await
            }
            Scenario::Restarts => {
                restarts::run(
                    &exe,
                    dir.path(),
                    &restarts::Restarts {
                        broker: args.broker.clone(),
                        tasks: args.tasks,
                        concurrency: args.concurrency,
                        stall,
                    },
                )
                .await
            }
            Scenario::SqliteRace => {
                sqlite_race::run(
                    &exe,
                    dir.path(),
                    &sqlite_race::SqliteRace {
                        tasks: args.tasks,
                        kills: args.kills,
                        pause: Duration::from_millis(500),
                        concurrency: args.concurrency,
                        stall,
                    },
                )
                .await
            }
        }
        .map_err(failure)?;
        tallies.push(tally);
    }
    print!("{}", table(&tallies));
    let unclean: Vec<&str> = tallies
        .iter()
        .filter(|t| !t.is_clean())
        .map(|t| t.scenario.as_str())
        .collect();
    if unclean.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            ExitStatus::TaskFailed,
            anyhow::anyhow!(
                "tasks were lost or wrong, or a check failed: {}",
                unclean.join(", ")
            ),
        ))
    }
}

/// A server that is not on this machine is bad input (2); anything else is internal (70).
fn failure(error: anyhow::Error) -> Failure {
    if error.is::<NotLocal>() {
        Failure::new(ExitStatus::BadInput, error)
    } else {
        Failure::internal(error)
    }
}
