//! The `wasmq` binary: results on stdout, one readable line on stderr, documented exit codes.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::{HOSTILE, MATH, TEXT};

/// A file that exists but is not WebAssembly.
const NOT_WASM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");

/// Runs `wasmq` in a fresh temporary folder: a command's relative defaults (the embedded
/// broker `.wasmq/wasmq.db`, `.wasmq/plugins`) land there, not in the crate directory cargo
/// runs the tests in. `stdin` is its standard input.
fn wasmq_with_input(args: &[&str], stdin: &str) -> Output {
    use std::io::Write as _;
    let cache = std::env::temp_dir().join(format!("wasmq-cli-test-cache-{}", std::process::id()));
    let cwd = tempfile::tempdir().expect("a temporary working directory");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .current_dir(cwd.path())
        .args(args)
        .env("WASMQ_CACHE_DIR", &cache)
        .env("WASMQ_LOG", "off")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wasmq");
    let mut input = child.stdin.take().expect("a pipe to its stdin");
    // A command that reads nothing may exit before the write: that is not an error here.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    child.wait_with_output().expect("wait for wasmq")
}

/// (exit code, stdout, stderr)
fn run(args: &[&str]) -> (i32, String, String) {
    run_with_input(args, "")
}

/// [`run`] with `stdin` as its standard input.
fn run_with_input(args: &[&str], stdin: &str) -> (i32, String, String) {
    let output = wasmq_with_input(args, stdin);
    (
        output.status.code().expect("exit code"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn call_prints_the_json_result() {
    assert_eq!(
        run(&["call", MATH, "math.add", "[2, 3]"]),
        (0, "5\n".into(), String::new())
    );
    assert_eq!(
        run(&["call", MATH, "math.add", "[2]", "--kwargs", r#"{"b": 5}"#]),
        (0, "7\n".into(), String::new())
    );
    assert_eq!(
        run(&["call", TEXT, "text.slugify", r#"["Hello World"]"#]),
        (0, "\"hello-world\"\n".into(), String::new())
    );
}

#[test]
fn failures_are_one_line_with_distinct_exit_codes() {
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["call", MATH, "math.div", "[1, 0]"],
            1,
            "error: math.div failed: ZeroDivisionError: division by zero\n",
        ),
        (
            &["call", HOSTILE, "hostile.spin", "--fuel", "100000000"],
            3,
            "error: hostile.spin ran out of CPU time (budget 10ms of CPU = 100000000 fuel)\n",
        ),
        (
            &[
                "call",
                HOSTILE,
                "hostile.spin",
                "--fuel",
                "100000000",
                "--cpu-metering",
                "fuel",
            ],
            3,
            "error: hostile.spin ran out of fuel (budget 100000000)\n",
        ),
        (
            &[
                "call",
                HOSTILE,
                "hostile.spin",
                "--timeout",
                "100ms",
                "--fuel",
                "18446744073709551615",
            ],
            3,
            "error: hostile.spin exceeded its time limit (100ms)\n",
        ),
        (
            &["call", HOSTILE, "hostile.hog", "--memory", "16MiB"],
            3,
            "error: hostile.hog exceeded its memory limit (16 MiB)\n",
        ),
        (
            &["call", MATH, "math.add", "[1, 2"],
            2,
            "error: ARGS_JSON is not JSON: EOF while parsing a list at line 1 column 5\n",
        ),
        (
            &["call", MATH, "math.pow", "[1, 2]"],
            2,
            "error: plugin math has no task named math.pow (it has: math.add, math.mul, math.fib, math.sum, math.div, math.sqrt, math.flaky, math.unstable, math.throttled, math.cooperative, math.sleep, math.bounded, math.give_up, math.total, math.add_quietly, math.budgeted, math.collatz, math.second_chance, math.debug_task, math.identity)\n",
        ),
        (
            &["call", NOT_WASM, "math.add", "[1, 2]"],
            4,
            "error: Cargo is not a WebAssembly file\n",
        ),
        (
            &["call", "/nonexistent.wasm", "math.add", "[1, 2]"],
            2,
            "error: cannot read /nonexistent.wasm: No such file or directory (os error 2)\n",
        ),
        (
            &["call", MATH, "math.add", "[1, 2]", "--memory", "lots"],
            2,
            "",
        ),
    ];
    for (args, code, stderr) in cases {
        let (actual_code, stdout, actual_stderr) = run(args);
        assert_eq!(actual_code, *code, "{args:?}: {actual_stderr}");
        assert_eq!(stdout, "", "{args:?}");
        if stderr.is_empty() {
            // clap's usage error: it names the bad value.
            assert!(
                actual_stderr.contains("`lots` is not a size"),
                "{actual_stderr}"
            );
        } else {
            assert_eq!(actual_stderr, *stderr, "{args:?}");
        }
    }
}

#[test]
fn inspect_lists_tasks_with_parameters_limits_and_docs() {
    let (code, stdout, stderr) = run(&["plugins", "inspect", TEXT]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("plugin text (wasmq:task@0.3.0, Rust, "),
        "{stdout}"
    );
    assert!(
        stdout.contains("  text.word_count(text)\n      Counts the words"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "  text.markdown(source)\n      default limits: memory 64 MiB, timeout 10s\n"
        ),
        "{stdout}"
    );
    let (code, _, stderr) = run(&["plugins", "inspect", NOT_WASM]);
    assert_eq!(code, 4);
    assert_eq!(stderr, "error: Cargo is not a WebAssembly file\n");
}

#[test]
fn send_follows_the_config_routes_and_revoke_broadcasts() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    let config = dir.path().join("wasmq.toml");
    std::fs::write(
        &config,
        format!(
            "broker = \"{url}\"\nresult_backend = \"{url}\"\n[routes]\n\"math.*\" = \"math\"\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, id, stderr) = run(&["send", "--config", config, "math.add", "[1, 2]"]);
    assert_eq!((code, stderr.as_str()), (0, ""), "{id}");
    let (code, other, _) = run(&["send", "--config", config, "text.slugify", "[\"A b\"]"]);
    assert_eq!(code, 0, "{other}");
    let broker = wasmq::broker::connect(&url).unwrap();
    crate::support::runtime().block_on(async {
        assert_eq!(broker.queue_length("math").await.unwrap(), 1, "routed");
        assert_eq!(
            broker.queue_length("celery").await.unwrap(),
            1,
            "the default queue"
        );
    });

    let (code, stdout, stderr) = run(&["revoke", "--config", config, id.trim(), "--terminate"]);
    assert_eq!(
        (code, stdout, stderr),
        (
            0,
            format!("revoked {} (terminate)\n", id.trim()),
            String::new()
        )
    );
    let seen = crate::support::runtime().block_on(async {
        let mut revocations = broker.revocations("cli-test").await.unwrap();
        revocations.recv().await.unwrap()
    });
    assert_eq!((seen.task_id.as_str(), seen.terminate), (id.trim(), true));

    let (code, _, stderr) = run(&["revoke", "--config", config]);
    assert_eq!(code, 2, "no id is a usage error: {stderr}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[routes]\n\"math.*\" = \"\"\n").unwrap();
    let (code, _, stderr) = run(&[
        "send",
        "--config",
        bad.to_str().unwrap(),
        "math.add",
        "[1, 2]",
    ]);
    assert_eq!(
        (code, stderr.as_str()),
        (
            2,
            "error: routes: route \"math.*\" needs a task pattern and a queue\n"
        )
    );
}

/// `wasmq send --bulk`: one task per line (an args array for the command line's task, or a
/// Celery signature), each id printed once confirmed, in order; the flags are every line's
/// defaults and a line's options win; a bad line stops the command with its number, after
/// the lines before it were sent.
#[test]
fn send_bulk_publishes_one_task_per_line_and_stops_at_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    let lines = concat!(
        "[1, 2]\n",
        "{\"task\": \"text.slugify\", \"args\": [\"A b\"], \"options\": {\"queue\": \"text\"}}\n",
        "\n",
        "{\"args\": [3, 4], \"kwargs\": {}, \"options\": {\"priority\": 5}, \"subtask_type\": null}\n",
    );
    let bulk = ["send", "--broker", &url, "--bulk", "math.add", "-Q", "bulk"];
    let (code, stdout, stderr) = run_with_input(&bulk, lines);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.starts_with("sent 3 tasks, all confirmed"),
        "{stderr}"
    );
    let ids: Vec<&str> = stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{stdout}");

    let broker = wasmq::broker::connect(&url).unwrap();
    crate::support::runtime().block_on(async {
        assert_eq!(
            broker.queue_length("text").await.unwrap(),
            1,
            "a line's queue"
        );
        let mut consumer = broker.consume(&["bulk".to_owned()], 10).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let delivery = consumer.next().await.unwrap();
            let message = wasmq::protocol::TaskMessage::decode(&delivery.envelope).unwrap();
            seen.push((
                message.id.clone(),
                message.task.clone(),
                message.args.clone(),
                delivery.envelope.properties.priority == Some(5),
            ));
            delivery.ack().await.unwrap();
        }
        seen.sort_by_key(|(_, _, args, _)| args[0].as_i64());
        assert_eq!(
            seen,
            vec![
                (
                    ids[0].to_owned(),
                    "math.add".to_owned(),
                    vec![1.into(), 2.into()],
                    false
                ),
                (
                    ids[2].to_owned(),
                    "math.add".to_owned(),
                    vec![3.into(), 4.into()],
                    true
                ),
            ]
        );
        consumer.close().await;
    });

    // A bad line: the lines before it are sent, the error names it, nothing after it is.
    let (code, stdout, stderr) = run_with_input(&bulk, "[5, 6]\n{\"task\": 7}\n[7, 8]\n");
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stderr.ends_with(
            "error: line 2: \"task\" must be a string; stopped there (1 task before it was sent)\n"
        ),
        "{stderr}"
    );
    crate::support::runtime().block_on(async {
        assert_eq!(broker.queue_length("bulk").await.unwrap(), 1);
    });
    let (code, _, stderr) = run(&["send", "--broker", &url, "--bulk", "math.add", "[1]"]);
    assert_eq!(code, 2, "args and --bulk conflict: {stderr}");
}

/// Bug 2 of issue 11: cargo runs the tests with the crate directory (`runtime/`) as the
/// working directory, and a spawned `wasmq` whose defaults are relative
/// (`sqlite://.wasmq/wasmq.db`, `.wasmq/state/`, `.wasmq/plugins`) wrote `runtime/.wasmq`.
/// Every `wasmq` a test spawns must run in a temporary folder.
#[test]
fn regression_spawned_commands_write_nothing_into_the_crate_directory() {
    let crate_state = Path::new(env!("CARGO_MANIFEST_DIR")).join(".wasmq");
    // Without --broker, `dead-letters` opens the default embedded broker: it creates
    // .wasmq/wasmq.db in its working directory.
    let (code, stdout, stderr) = run(&["dead-letters"]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
    assert!(
        !crate_state.exists(),
        "a test wrote {} (or an older run left it: remove it)",
        crate_state.display()
    );
}

/// `wasmq bench cpu` (one round): every workload computes the same answer natively and in
/// every sandbox (the bench fails otherwise), and a spinning task is stopped by its CPU
/// budget under both meterings a worker can run with.
#[test]
fn bench_cpu_runs_every_workload_alike_natively_and_sandboxed() {
    let cache = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args(["bench", "cpu", "--rounds", "1", "--cache-dir"])
        .arg(cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for workload in ["fib", "markdown", "regex", "json", "sha256", "sort"] {
        assert!(stdout.contains(&format!("| {workload}(")), "{stdout}");
    }
    assert!(
        stdout.contains("| time | ") && stdout.contains("ran out of CPU time (budget 100ms"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| fuel | ") && stdout.contains("ran out of fuel (budget 1000000000)"),
        "{stdout}"
    );
}
