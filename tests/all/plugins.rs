//! Every task of the `math` and `text` plugins, through the real sandbox.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{MATH, TEXT};
use serde_json::json;
use wasmq::engine::{CallRequest, Outcome, StateUpdate, TaskFailure};

use crate::support::{call, load, runtime, sandbox, success};

#[test]
fn math_tasks() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let names: Vec<&str> = math.tasks().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "math.add",
                "math.mul",
                "math.fib",
                "math.sum",
                "math.div",
                "math.sqrt",
                "math.flaky",
                "math.unstable",
                "math.throttled",
                "math.cooperative",
                "math.sleep",
                "math.bounded",
                "math.give_up",
                "math.total",
                "math.add_quietly",
                "math.budgeted",
                "math.collatz",
                "math.second_chance",
                "math.debug_task",
                "math.identity",
            ]
        );
        // The SDK's policy options reach the host through describe.
        let unstable = &math.task("math.unstable").unwrap().policy;
        assert_eq!(
            unstable.autoretry_for.as_deref(),
            Some(&["ConnectionError".to_owned()][..])
        );
        assert_eq!(unstable.max_retries, Some(4));
        assert_eq!(unstable.retry_backoff, Some(Duration::from_millis(100)));
        assert_eq!(unstable.retry_backoff_max, Some(Duration::from_secs(1)));
        assert_eq!(unstable.retry_jitter, Some(false));
        assert_eq!(
            math.task("math.throttled").unwrap().policy.rate_limit,
            Some(wasmq::policy::RateLimit::parse("5/s").unwrap())
        );
        assert_eq!(
            math.task("math.add").unwrap().policy,
            wasmq::policy::PolicyOverrides::default()
        );
        assert_eq!(math.task("math.add").unwrap().params, ["a", "b"]);
        assert_eq!(math.task("math.add").unwrap().doc, "Adds two integers.");

        assert_eq!(
            success(&sandbox, &math, "math.add", "[2, 3]").await,
            json!(5)
        );
        assert_eq!(
            success(&sandbox, &math, "math.mul", "[6, 7]").await,
            json!(42)
        );
        assert_eq!(
            success(&sandbox, &math, "math.fib", "[20]").await,
            json!(6765)
        );
        assert_eq!(
            success(&sandbox, &math, "math.sum", "[[1, 2.5, 3]]").await,
            json!(6.5)
        );
        assert_eq!(
            success(&sandbox, &math, "math.div", "[7, 2]").await,
            json!(3.5)
        );
        assert_eq!(
            success(&sandbox, &math, "math.sqrt", "[9]").await,
            json!(3.0)
        );

        let report = call(&sandbox, &math, "math.div", "[1, 0]").await;
        assert_eq!(
            report.outcome,
            Outcome::Failed(TaskFailure::new("ZeroDivisionError", "division by zero"))
        );
        let report = call(&sandbox, &math, "math.add", &format!("[{}, 1]", i64::MAX)).await;
        assert!(matches!(&report.outcome, Outcome::Failed(f) if f.kind == "OverflowError"));
        let report = call(&sandbox, &math, "math.fib", "[93]").await;
        assert!(matches!(&report.outcome, Outcome::Failed(f) if f.kind == "ValueError"));
        let report = call(&sandbox, &math, "math.sqrt", "[-1]").await;
        assert_eq!(
            report.outcome,
            Outcome::Rejected {
                reason: "cannot take the square root of -1".into(),
                requeue: false,
            }
        );
    });
}

#[test]
fn keyword_arguments_bind_like_python() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let mut request = CallRequest::new("math.add", "[2]");
        request.kwargs_json = r#"{"b": 40}"#.into();
        let report = sandbox.call(&math, request).await.unwrap();
        assert_eq!(report.outcome, Outcome::Success("42".into()));

        let mut request = CallRequest::new("math.add", "[]");
        request.kwargs_json = r#"{"b": 1, "a": 2}"#.into();
        let report = sandbox.call(&math, request).await.unwrap();
        assert_eq!(report.outcome, Outcome::Success("3".into()));
    });
}

#[test]
fn bad_arguments_are_type_errors_naming_task_parameter_and_type() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let cases: [(&str, &str, &str); 6] = [
            (
                "[1, \"x\"]",
                "{}",
                "math.add: argument `b` must be i64: invalid type: string \"x\", expected i64",
            ),
            (
                "[1, 2, 3]",
                "{}",
                "math.add takes 2 positional arguments (a, b) but 3 were given",
            ),
            (
                "[1]",
                "{}",
                "math.add missing required argument `b` (i64); parameters: a, b",
            ),
            (
                "[1]",
                r#"{"c": 2}"#,
                "math.add got an unexpected keyword argument `c` (parameters: a, b)",
            ),
            (
                "[1, 2]",
                r#"{"a": 2}"#,
                "math.add got multiple values for argument `a`",
            ),
            (
                "{\"a\": 1}",
                "{}",
                "math.add: positional arguments must be a JSON array",
            ),
        ];
        for (args, kwargs, expected) in cases {
            let mut request = CallRequest::new("math.add", args);
            request.kwargs_json = kwargs.into();
            let report = sandbox.call(&math, request).await.unwrap();
            match &report.outcome {
                Outcome::InvalidArguments { message } => {
                    assert!(message.starts_with(expected), "{args} {kwargs}: {message}");
                }
                other => panic!("{args} {kwargs}: expected invalid arguments, got {other}"),
            }
        }
    });
}

#[test]
fn retry_requests_carry_their_countdown_and_see_the_retry_count() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let report = call(&sandbox, &math, "math.flaky", "[2]").await;
        assert_eq!(
            report.outcome,
            Outcome::Retry {
                countdown: Some(Duration::from_millis(100)),
                reason: "attempt 1 of 3: not yet".into(),
                exc: None,
                args: None,
                kwargs: None,
                max_retries: None,
                expires: None,
            }
        );
        let mut request = CallRequest::new("math.flaky", "[2]");
        request.retries = 2;
        let report = sandbox.call(&math, request).await.unwrap();
        assert_eq!(report.outcome, Outcome::Success("2".into()));
    });
}

#[test]
fn text_tasks_including_a_real_crate() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let text = load(&sandbox, TEXT).await;
        assert_eq!(
            success(
                &sandbox,
                &text,
                "text.word_count",
                r#"["the quick  brown\tfox\n"]"#
            )
            .await,
            json!(4)
        );
        assert_eq!(
            success(
                &sandbox,
                &text,
                "text.slugify",
                r#"["  Hello, Wörld! 2026 edition "]"#
            )
            .await,
            json!("hello-w-rld-2026-edition")
        );
        let html = success(
            &sandbox,
            &text,
            "text.markdown",
            r##"["# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n~~old~~ *new*"]"##,
        )
        .await;
        let html = html.as_str().unwrap();
        assert!(html.contains("<h1>Title</h1>"), "{html}");
        assert!(html.contains("<table>"), "{html}");
        assert!(html.contains("<del>old</del> <em>new</em>"), "{html}");
    });
}

#[test]
fn update_state_reaches_the_listener() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let text = load(&sandbox, TEXT).await;
        let seen: Arc<Mutex<Vec<StateUpdate>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let mut request = CallRequest::new("text.markdown", r#"["*hi*"]"#);
        request.id = "task-42".into();
        let report = sandbox
            .call_with_listener(
                &text,
                request,
                Some(Arc::new(move |u| sink.lock().unwrap().push(u))),
            )
            .await
            .unwrap();
        assert!(report.outcome.is_success());
        let seen = seen.lock().unwrap();
        assert_eq!(
            *seen,
            [StateUpdate {
                task_id: "task-42".into(),
                state: "RENDERED".into(),
                meta: json!({"input_bytes": 4, "html_bytes": 19}),
            }]
        );
    });
}

#[test]
fn unknown_task_is_a_call_error_listing_the_available_tasks() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let error = sandbox
            .call(&math, CallRequest::new("math.pow", "[2, 3]"))
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "plugin math has no task named math.pow (it has: math.add, math.mul, math.fib, math.sum, math.div, math.sqrt, math.flaky, math.unstable, math.throttled, math.cooperative, math.sleep, math.bounded, math.give_up, math.total, math.add_quietly, math.budgeted, math.collatz, math.second_chance, math.debug_task, math.identity)"
        );
    });
}

/// A plugin built with the previous SDK (`wasmq:task@0.2.0`, kept in `tests/fixtures`) keeps
/// loading and running after the contract moved to 0.3.0: its failures simply carry no
/// arguments of their own.
#[test]
fn a_plugin_built_for_the_previous_contract_keeps_running() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let old = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/math-wit-0.2.0.wasm"
        );
        let math = load(&sandbox, old).await;
        assert_eq!(math.contract_version(), "0.2.0");
        assert_eq!(load(&sandbox, MATH).await.contract_version(), "0.3.0");
        assert_eq!(
            success(&sandbox, &math, "math.add", "[2, 3]").await,
            json!(5)
        );
        let report = call(&sandbox, &math, "math.div", "[1, 0]").await;
        assert_eq!(
            report.outcome,
            Outcome::Failed(TaskFailure::new("ZeroDivisionError", "division by zero"))
        );
        let report = call(&sandbox, &math, "math.flaky", "[1]").await;
        assert!(
            matches!(
                &report.outcome,
                Outcome::Retry {
                    exc: None,
                    countdown: Some(_),
                    ..
                }
            ),
            "{:?}",
            report.outcome
        );
    });
}

/// Exceptions keep their class path and arguments (`TaskError::raised`), and a retry
/// request can name the failure it ends with (`or_fail_with`, Celery's `retry(exc=…)`).
#[test]
fn failures_carry_their_class_path_and_arguments() {
    runtime().block_on(async {
        let sandbox = sandbox();
        let math = load(&sandbox, MATH).await;
        let report = call(&sandbox, &math, "math.bounded", "[7, 0, 5]").await;
        assert_eq!(
            report.outcome,
            Outcome::Failed(TaskFailure {
                kind: "wasmq_errors.OutOfRange".into(),
                message: "7.0, 0.0, 5.0".into(),
                args: Some(vec![json!(7.0), json!(0.0), json!(5.0)]),
            })
        );
        let report = call(&sandbox, &math, "math.give_up", "[]").await;
        let Outcome::Retry { exc: Some(exc), .. } = &report.outcome else {
            panic!("a retry naming its final failure: {:?}", report.outcome)
        };
        assert_eq!(exc.kind, "wasmq_errors.GaveUp");
        assert_eq!(
            exc.args,
            Some(vec![json!("the service never answers"), json!(0)])
        );
    });
}
