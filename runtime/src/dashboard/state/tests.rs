//! The picture built from events and inspect replies, event by event.

use super::*;

fn event(kind: &str, host: &str, at: f64, fields: Value) -> Event {
    let mut event = Event::new(kind, fields);
    event.stamp(host, at, 1, 1);
    event
}

#[test]
fn a_task_is_merged_from_its_events_and_counted_on_its_worker() {
    let mut state = State::new(10, &["celery".into()]);
    state.apply(&event(
        "worker-heartbeat",
        "wasmq@a",
        100.0,
        json!({"freq": 2.0, "active": 1, "processed": 7, "loadavg": [0.5, 0.25, 0.1], "sw_ident": "wasmq"}),
    ));
    state.apply(&event(
        "task-received",
        "wasmq@a",
        100.1,
        json!({"uuid": "t1", "name": "math.add", "args": "(2, 3)", "kwargs": "{}", "queue": "q1"}),
    ));
    state.apply(&event(
        "task-started",
        "wasmq@a",
        100.2,
        json!({"uuid": "t1"}),
    ));
    let running = state.snapshot(100.3, 10, None);
    assert_eq!(running["workers"][0]["running"][0]["id"], "t1");
    state.apply(&event(
        "task-succeeded",
        "wasmq@a",
        100.4,
        json!({"uuid": "t1", "result": "5", "runtime": 0.002}),
    ));
    // An older event arriving late does not take it back.
    state.apply(&event(
        "task-started",
        "wasmq@a",
        100.2,
        json!({"uuid": "t1"}),
    ));
    let snapshot = state.snapshot(101.0, 10, None);
    let task = &snapshot["tasks"][0];
    assert_eq!(task["state"], "SUCCESS");
    assert_eq!(task["name"], "math.add");
    assert_eq!(task["args"], "(2, 3)");
    assert_eq!(task["result"], "5");
    assert_eq!(task["runtime"], 0.002);
    let worker = &snapshot["workers"][0];
    assert_eq!(worker["online"], true);
    assert_eq!(worker["succeeded"], 1);
    assert_eq!(worker["running"].as_array().unwrap().len(), 0);
    let queues: Vec<&str> = snapshot["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(queues, ["celery", "q1"]);
    assert_eq!(snapshot["queues"][1]["consumers"], json!(["wasmq@a"]));
    let series = &snapshot["series"];
    assert_eq!(series["throughput"].as_array().unwrap().len(), 120);
    assert_eq!(series["throughput"][118], 1, "{series}");
    assert_eq!(series["runtime_mean_ms"][118], 2.0);
    // Past twice its heartbeat interval, a silent worker is offline; later it goes.
    assert_eq!(
        state.snapshot(104.5, 10, None)["workers"][0]["online"],
        false
    );
    state.prune(100.0 + FORGET_OFFLINE_AFTER + 1.0);
    assert!(
        state.snapshot(500.0, 10, None)["workers"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn limit_failures_are_counted_by_limit_and_only_for_wasmq_workers() {
    let mut state = State::new(10, &[]);
    state.apply(&event(
        "worker-online",
        "wasmq@a",
        1.0,
        json!({"sw_ident": "wasmq", "freq": 2.0}),
    ));
    state.apply(&event(
        "worker-online",
        "celery@py",
        1.0,
        json!({"sw_ident": "py-celery", "freq": 2.0}),
    ));
    let fail = |id: &str, host: &str, exception: &str| {
        event(
            "task-failed",
            host,
            2.0,
            json!({"uuid": id, "exception": exception}),
        )
    };
    state.apply(&fail(
        "a",
        "wasmq@a",
        "TimeLimitExceeded('hostile.spin ran out of fuel (budget 1)')",
    ));
    state.apply(&fail("b", "wasmq@a", "TimeLimitExceeded(0.2)"));
    state.apply(&fail(
        "c",
        "wasmq@a",
        "MemoryError('hostile.hog exceeded its memory limit')",
    ));
    state.apply(&fail(
        "d",
        "wasmq@a",
        "ZeroDivisionError('division by zero')",
    ));
    state.apply(&fail("e", "celery@py", "TimeLimitExceeded(1.0)"));
    let snapshot = state.snapshot(2.5, 10, None);
    let wasmq = &snapshot["workers"][1];
    assert_eq!(wasmq["hostname"], "wasmq@a");
    assert_eq!(
        wasmq["limit_hits"],
        json!({"fuel": 1, "time": 1, "memory": 1})
    );
    assert_eq!(wasmq["limit_hits_total"], 3);
    assert_eq!(wasmq["failed"], 4);
    assert_eq!(snapshot["workers"][0]["limit_hits_total"], 0);

    // The worker's own count (inspect stats, since it started) shows where it is larger;
    // a stale reply (taken before the last hit's event) never hides what events showed.
    state.apply_inspect(
        "stats",
        "wasmq@a",
        &json!({"wasmq": {"limit_hits": {"fuel": 7, "memory": 0, "time": 0}}}),
        3.0,
    );
    let snapshot = state.snapshot(3.5, 10, None);
    let wasmq = &snapshot["workers"][1];
    assert_eq!(
        wasmq["limit_hits"],
        json!({"fuel": 7, "time": 1, "memory": 1})
    );
    assert_eq!(wasmq["limit_hits_total"], 9);
    // One more time limit: its event and the next stats reply count it once.
    state.apply(&fail("f", "wasmq@a", "TimeLimitExceeded(0.2)"));
    state.apply_inspect(
        "stats",
        "wasmq@a",
        &json!({"wasmq": {"limit_hits": {"fuel": 7, "memory": 1, "time": 2}}}),
        4.0,
    );
    let snapshot = state.snapshot(4.5, 10, None);
    assert_eq!(
        snapshot["workers"][1]["limit_hits"],
        json!({"fuel": 7, "time": 2, "memory": 1})
    );
}

#[test]
fn only_the_latest_tasks_are_kept_and_inspect_replies_fill_in_workers() {
    let mut state = State::new(3, &[]);
    for i in 0..5 {
        state.apply(&event(
            "task-received",
            "wasmq@a",
            f64::from(i),
            json!({"uuid": format!("t{i}"), "name": "math.add"}),
        ));
    }
    let snapshot = state.snapshot(5.0, 10, None);
    let ids: Vec<&str> = snapshot["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["t4", "t3", "t2"]);
    let found = state.snapshot(5.0, 10, Some("t3"));
    assert_eq!(found["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(found["tasks"][0]["uuid"], "t3");
    state.apply_inspect(
        "stats",
        "celery@py",
        &json!({"pool": {"max-concurrency": 4}}),
        5.0,
    );
    state.apply_inspect(
        "active_queues",
        "celery@py",
        &json!([{"name": "reports"}]),
        5.0,
    );
    state.apply_inspect(
        "active",
        "celery@py",
        &json!([{"id": "x", "name": "proj.slow", "args": [1], "time_start": 4.0}]),
        5.0,
    );
    let snapshot = state.snapshot(5.5, 10, None);
    let py = &snapshot["workers"][0];
    assert_eq!(py["hostname"], "celery@py");
    assert_eq!(py["online"], true);
    assert_eq!(py["concurrency"], 4);
    assert_eq!(py["running"][0]["id"], "x");
    assert_eq!(py["running"][0]["args"], "[1]");
    assert_eq!(snapshot["queues"][0]["name"], "reports");
    assert_eq!(snapshot["queues"][0]["consumers"][0], "celery@py");
}
