//! The short versions of `wasmq chaos`'s scenarios: real `wasmq` processes killed with
//! SIGKILL during a drain, on the embedded broker, on RabbitMQ (results in Redis) and racing
//! on one SQLite file. Each must lose nothing and store nothing wrong; tasks run twice are
//! counted (at-least-once), and the tally is printed for the log.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wasmq::chaos::kill_workers::{self, KillWorkers};
use wasmq::chaos::sqlite_race::{self, SqliteRace};
use wasmq::chaos::{Tally, table};

use crate::support::{RABBITMQ, runtime};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wasmq"))
}

/// Prints the tally (the test log is where its figures are read) and checks it.
fn assert_clean(tally: &Tally, faults: usize) {
    eprintln!("{}", table(std::slice::from_ref(tally)));
    assert!(tally.is_clean(), "{tally:#?}");
    assert_eq!(tally.faults, faults, "every planned fault was injected");
    assert!(tally.sent > 0);
}

#[test]
fn a_worker_killed_again_and_again_on_the_embedded_broker_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("chaos.db").display());
    let options = KillWorkers {
        broker: db.clone(),
        results: db,
        tasks: 2_000,
        kills: 4,
        concurrency: 2,
        stall: Duration::from_secs(60),
    };
    let tally = runtime()
        .block_on(kill_workers::run(exe(), dir.path(), &options))
        .unwrap();
    assert_clean(&tally, 4);
    assert_eq!(tally.sent, 2_000);
    assert!(
        tally
            .checks
            .iter()
            .any(|c| c.found == "integrity_check: ok"),
        "{:?}",
        tally.checks
    );
}

#[test]
fn a_worker_killed_again_and_again_on_rabbitmq_loses_nothing() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let options = KillWorkers {
        broker: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        results: "redis://127.0.0.1:6379/0".into(),
        tasks: 2_000,
        kills: 4,
        concurrency: 2,
        stall: Duration::from_secs(60),
    };
    let tally = runtime()
        .block_on(kill_workers::run(exe(), dir.path(), &options))
        .unwrap();
    assert_clean(&tally, 4);
    assert_eq!(tally.sent, 2_000);
}

#[test]
fn workers_and_a_publisher_racing_on_one_sqlite_file_under_kill_9_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteRace {
        tasks: 3_000,
        kills: 8,
        pause: Duration::from_millis(300),
        concurrency: 2,
        stall: Duration::from_secs(60),
    };
    let tally = runtime()
        .block_on(sqlite_race::run(exe(), dir.path(), &options))
        .unwrap();
    assert_clean(&tally, 8);
    assert!(
        tally
            .checks
            .iter()
            .any(|c| c.found == "integrity_check: ok"),
        "{:?}",
        tally.checks
    );
}

#[test]
fn wasmq_chaos_prints_its_table_and_refuses_another_machine() {
    let output = Command::new(exe())
        .args([
            "chaos",
            "--only",
            "kill-embedded",
            "--tasks",
            "200",
            "--kills",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("| scenario | sent | completed | lost |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| kill-workers (embedded) | 200 | 200 | 0 | 0 |"),
        "{stdout}"
    );

    let output = Command::new(exe())
        .args(["chaos", "--only", "kill-rabbitmq", "--broker"])
        .arg("amqp://guest:guest@rabbit.example:5672/%2f")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: this harness only targets servers on this machine; amqp://guest:guest@rabbit.example:5672/%2f is not 127.0.0.1"),
        "{stderr}"
    );
}

#[test]
#[ignore = "fails in CI (2026-12-02): after a reset the loss was not logged, and after a half-open link 26 messages stayed in the queue when the worker stopped (nothing lost); not yet diagnosed - run with --ignored"]
fn a_worker_behind_a_faulty_network_finds_dead_links_by_heartbeat_and_loses_nothing() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let options = wasmq::chaos::network::NetworkFaults {
        broker: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        results: "redis://127.0.0.1:6379/0".into(),
        tasks: 2_000,
        concurrency: 2,
        heartbeat: 2,
        stall: Duration::from_secs(60),
    };
    let tally = runtime()
        .block_on(wasmq::chaos::network::run(exe(), dir.path(), &options))
        .unwrap();
    assert_clean(&tally, 4);
    assert_eq!(tally.sent, 2_000);
}

#[test]
fn the_results_redis_and_rabbitmq_restarted_during_a_drain_lose_nothing() {
    // Stopping RabbitMQ disturbs every other RabbitMQ test: run alone.
    let _exclusive = RABBITMQ
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    // Enough tasks that the drain outlasts RabbitMQ's `stop_app`, which takes seconds to
    // close the worker's connection.
    let options = wasmq::chaos::restarts::Restarts {
        broker: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        tasks: 10_000,
        concurrency: 2,
        stall: Duration::from_secs(60),
    };
    let tally = runtime()
        .block_on(wasmq::chaos::restarts::run(exe(), dir.path(), &options))
        .unwrap();
    assert_clean(&tally, 2);
    assert_eq!(tally.sent, 10_000);
    assert!(
        tally.mean_recovery > Duration::ZERO,
        "a restart interrupted the drain: {tally:#?}"
    );
}
