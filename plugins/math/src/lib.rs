//! `math`: small arithmetic tasks, the "hello world" of wasmq.

use std::time::Duration;

use wasmq_sdk::serde_json::{Value, json};
use wasmq_sdk::{TaskContext, TaskError, task};

/// Adds two integers.
#[task]
fn add(a: i64, b: i64) -> Result<i64, TaskError> {
    a.checked_add(b)
        .ok_or_else(|| TaskError::failed("OverflowError", format!("{a} + {b} overflows i64")))
}

/// Multiplies two integers.
#[task]
fn mul(a: i64, b: i64) -> Result<i64, TaskError> {
    a.checked_mul(b)
        .ok_or_else(|| TaskError::failed("OverflowError", format!("{a} * {b} overflows i64")))
}

/// The n-th Fibonacci number, computed recursively on purpose: a CPU-bound, call-heavy task.
#[task]
fn fib(n: u32) -> Result<u64, TaskError> {
    if n > 92 {
        return Err(TaskError::failed(
            "ValueError",
            format!("fib({n}) does not fit in u64 (n must be at most 92)"),
        ));
    }
    Ok(fib_rec(n))
}

fn fib_rec(n: u32) -> u64 {
    if n < 2 {
        u64::from(n)
    } else {
        fib_rec(n - 1) + fib_rec(n - 2)
    }
}

/// Sums a list of numbers.
#[task]
fn sum(numbers: Vec<f64>) -> f64 {
    numbers.iter().sum()
}

/// Divides `a` by `b`; fails with `ZeroDivisionError` when `b` is zero.
#[task]
fn div(a: f64, b: f64) -> Result<f64, TaskError> {
    if b == 0.0 {
        return Err(TaskError::failed("ZeroDivisionError", "division by zero"));
    }
    Ok(a / b)
}

/// The square root of `x`; a negative `x` is rejected (it can never succeed, so retrying or
/// redelivering it is pointless).
#[task]
fn sqrt(x: f64) -> Result<f64, TaskError> {
    if x < 0.0 {
        return Err(TaskError::reject(format!(
            "cannot take the square root of {x}"
        )));
    }
    Ok(x.sqrt())
}

/// Asks to be retried (after 100 ms) until it has been retried `succeed_after` times, then
/// returns the number of retries: a stand-in for a task whose dependency is briefly down.
#[task]
fn flaky(ctx: &TaskContext, succeed_after: u32) -> Result<u32, TaskError> {
    if ctx.retries() < succeed_after {
        return Err(TaskError::retry(format!(
            "attempt {} of {}: not yet",
            ctx.retries() + 1,
            succeed_after + 1
        ))
        .after(Duration::from_millis(100)));
    }
    Ok(ctx.retries())
}

/// Fails with `ConnectionError` until it has been retried `succeed_after` times, then
/// returns the number of retries. It never asks for a retry itself: its policy retries
/// `ConnectionError` automatically, with exponential backoff (100 ms, 200 ms, 400 ms…,
/// capped at 1 s, without jitter so the delays can be checked).
#[task(
    autoretry_for = ["ConnectionError"],
    max_retries = 4,
    retry_backoff = "100ms",
    retry_backoff_max = "1s",
    retry_jitter = false
)]
fn unstable(ctx: &TaskContext, succeed_after: u32) -> Result<u32, TaskError> {
    if ctx.retries() < succeed_after {
        return Err(TaskError::failed(
            "ConnectionError",
            format!("attempt {}: the service is down", ctx.retries() + 1),
        ));
    }
    Ok(ctx.retries())
}

/// Returns `x`, at most 5 times a second per worker: a stand-in for a call to a service
/// with a quota.
#[task(rate_limit = "5/s")]
fn throttled(x: i64) -> i64 {
    x
}

/// Works in 10 ms steps until `steps` are done or its soft time limit passes, then returns
/// how many steps it finished: a cooperative task that stops cleanly before the hard limit.
#[task]
fn cooperative(ctx: &TaskContext, steps: u32) -> u32 {
    let mut done = 0;
    while done < steps && !ctx.should_stop() {
        std::thread::sleep(Duration::from_millis(10));
        done += 1;
    }
    done
}

/// Sleeps for `seconds` (without using CPU), then returns them: a stand-in for I/O-bound
/// work such as waiting on a remote service.
#[task]
fn sleep(seconds: f64) -> Result<f64, TaskError> {
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|e| TaskError::failed("ValueError", format!("cannot sleep {seconds} s: {e}")))?;
    std::thread::sleep(duration);
    Ok(seconds)
}

/// Returns `x` when it lies within `[low, high]`; otherwise fails with the custom exception
/// `wasmq_errors.OutOfRange(x, low, high)` — a class of the caller's own module, with its
/// arguments, so a Python client catches it as that class and reads `exc.args` back.
#[task]
fn bounded(x: f64, low: f64, high: f64) -> Result<f64, TaskError> {
    if (low..=high).contains(&x) {
        Ok(x)
    } else {
        Err(TaskError::raised("wasmq_errors.OutOfRange", (x, low, high)))
    }
}

/// Asks for a retry every time; once its one retry is spent it fails with the exception it
/// named in the request (Celery's `self.retry(exc=…)`), `wasmq_errors.GaveUp`, instead of
/// `MaxRetriesExceededError`.
#[task(max_retries = 1, default_retry_delay = "10ms")]
fn give_up(ctx: &TaskContext) -> Result<(), TaskError> {
    Err(
        TaskError::retry("the service never answers").or_fail_with(TaskError::raised(
            "wasmq_errors.GaveUp",
            ("the service never answers", ctx.retries()),
        )),
    )
}

/// Adds any number of numbers, as Python's `def total(*numbers)`: `total(1, 2, 3)` is 6.
#[task]
fn total(#[args] numbers: Vec<f64>) -> f64 {
    numbers.iter().sum()
}

/// Adds like `add`, but declares `ignore_result` (Celery's task attribute): a
/// fire-and-forget call stores nothing, unless its message asks for the result
/// (`ignore_result=False`).
#[task(ignore_result = true)]
fn add_quietly(a: i64, b: i64) -> Result<i64, TaskError> {
    add(a, b)
}

/// `cooperative` with declared limits (Celery's `time_limit` and `soft_time_limit` task
/// attributes): it works in 10 ms steps until its soft limit passes — 300 ms, unless the
/// message sets another — and no message can give it more than 5 s.
#[task(time_limit = "5s", soft_time_limit = "300ms")]
fn budgeted(ctx: &TaskContext, steps: u32) -> u32 {
    cooperative(ctx, steps)
}

/// Counts the steps of the Collatz sequence from `n` down to 1 by retrying itself: each
/// retry runs with the next number and the steps so far as its new arguments (Celery's
/// `self.retry(args=…, kwargs=…)`) and allows as many retries as the sequence needs
/// (`max_retries`).
#[task]
fn collatz(n: u64, steps: Option<u32>) -> Result<u32, TaskError> {
    let steps = steps.unwrap_or(0);
    if n <= 1 {
        return Ok(steps);
    }
    let next = if n.is_multiple_of(2) {
        n / 2
    } else {
        n.checked_mul(3)
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| TaskError::failed("OverflowError", format!("3 × {n} + 1 overflows")))?
    };
    Err(TaskError::retry(format!("{n} → {next}"))
        .after(Duration::ZERO)
        .args((next,))
        .kwargs(json!({"steps": steps + 1}))
        .max_retries(1000))
}

/// Returns `x`, but only when its message is delivered a second time: the first time it
/// puts the message back in its queue (Celery's `Reject(requeue=True)`) — a stand-in for
/// a task that finds this worker not ready and lets the message come round again.
#[task]
fn second_chance(ctx: &TaskContext, x: i64) -> Result<i64, TaskError> {
    if !ctx.redelivered() {
        return Err(TaskError::requeue("not on the first delivery"));
    }
    Ok(x)
}

/// What the task knows about the call it serves, like Celery's `debug_task` printing
/// `self.request`: its id and retries, the eta and expiry, the time limits its message
/// asked for (seconds), the priority, whether it was delivered before, the custom headers
/// and the message properties.
#[task]
fn debug_task(ctx: &TaskContext) -> Value {
    let seconds = |limit: Option<Duration>| limit.map(|t| t.as_secs_f64());
    json!({
        "id": ctx.id(),
        "retries": ctx.retries(),
        "eta": ctx.eta(),
        "expires": ctx.expires(),
        "time_limit": seconds(ctx.time_limit()),
        "soft_time_limit": seconds(ctx.soft_time_limit()),
        "priority": ctx.priority(),
        "redelivered": ctx.redelivered(),
        "headers": ctx.headers(),
        "properties": ctx.properties(),
    })
}

/// Returns `x` unchanged: the identity function, and a probe of what a workflow hands a
/// task (a chain step its parent's result, a chord body its header's results, nested when
/// the header held groups).
#[task]
fn identity(x: Value) -> Value {
    x
}

wasmq_sdk::export_tasks!(
    add,
    mul,
    fib,
    sum,
    div,
    sqrt,
    flaky,
    unstable,
    throttled,
    cooperative,
    sleep,
    bounded,
    give_up,
    total,
    add_quietly,
    budgeted,
    collatz,
    second_chance,
    debug_task,
    identity,
);
