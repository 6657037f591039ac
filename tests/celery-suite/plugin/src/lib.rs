//! The pure tasks of Celery 5.7.0's `t/integration/tasks.py`, ported to wasmq under their
//! Celery names (`t.integration.tasks.<name>`), so Celery's own integration suite can run
//! against a wasmq worker with the unmodified Python client.
//!
//! Each task keeps the Python task's parameter names, defaults, results and exception kinds
//! (the `python` module supplies Python's `+`, `sum()`, `repr()`…). Where the SDK cannot
//! express the Python signature the port says so on the task; in short:
//!
//! * `*args` becomes eight optional positional parameters `args0`…`args7` (the SDK has no
//!   variadic parameters), and a trailing explicit `None` is indistinguishable from an
//!   omitted argument;
//! * an explicit `None` for a parameter whose Python default is not `None` (`countdown=None`)
//!   counts as omitted: the SDK passes both as JSON `null`;
//! * `retry(expires=…, max_retries=…)` per call and `ignore_result` as a task attribute have
//!   no SDK counterpart: the per-call limits fall back to the task's declared ones.
//!   (`retry(exc=…)` is `TaskError::retry(…).or_fail_with(…)`; an exception's arguments are
//!   `TaskError::raised(kind, args)`.)
//!
//! Not ported (the suite's tests that use them are deselected or fail, see the README):
//! tasks that replace themselves, call Redis, call or build other tasks, or write files, and
//! tasks that read request fields the SDK does not expose (`delivery_info`, `headers`,
//! `properties`, `eta`, time limits, `is_eager`).

mod python;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmq_sdk::{TaskContext, TaskError, task};

use crate::python::{exception_repr, is_iterable, iterate, truthy};

/// The exception kind of `t.integration.tasks.ExpectedException`.
const EXPECTED_EXCEPTION: &str = "t.integration.tasks.ExpectedException";

/// The exception kind of `t.integration.tasks.UnpickleableException`.
const UNPICKLEABLE_EXCEPTION: &str = "t.integration.tasks.UnpickleableException";

/// `identity(x)`: returns the argument.
#[task(name = "t.integration.tasks.identity")]
fn identity(x: Value) -> Value {
    x
}

/// `add(x, y, z=None)`: `x + y`, or `x + y + z` when `z` is truthy.
#[task(name = "t.integration.tasks.add")]
fn add(x: Value, y: Value, z: Option<Value>) -> Result<Value, TaskError> {
    let sum = python::add(&x, &y)?;
    match z {
        Some(z) if truthy(&z) => python::add(&sum, &z),
        _ => Ok(sum),
    }
}

/// `mul(x, y)`: `x * y`.
#[task(name = "t.integration.tasks.mul")]
fn mul(x: Value, y: Value) -> Result<Value, TaskError> {
    python::mul(&x, &y)
}

/// `add_not_typed(x, y)`: `x + y` (in Python, without Celery's argument check at call time).
#[task(name = "t.integration.tasks.add_not_typed")]
fn add_not_typed(x: Value, y: Value) -> Result<Value, TaskError> {
    python::add(&x, &y)
}

/// `add_ignore_result(x, y)`: `x + y`. The Python task declares `ignore_result=True`; the
/// SDK has no such attribute, so the result is ignored only when the message says so (as
/// `add_ignore_result.delay()` does).
#[task(name = "t.integration.tasks.add_ignore_result")]
fn add_ignore_result(x: Value, y: Value) -> Result<Value, TaskError> {
    python::add(&x, &y)
}

/// `add_with_result(x, y)`: `x + y` (`ignore_result=False`, the default).
#[task(name = "t.integration.tasks.add_with_result")]
fn add_with_result(x: Value, y: Value) -> Result<Value, TaskError> {
    python::add(&x, &y)
}

/// `raise_error(*args)`: raises `ValueError("deliberate error")`.
#[task(name = "t.integration.tasks.raise_error")]
#[allow(clippy::too_many_arguments)]
fn raise_error(
    args0: Option<Value>,
    args1: Option<Value>,
    args2: Option<Value>,
    args3: Option<Value>,
    args4: Option<Value>,
    args5: Option<Value>,
    args6: Option<Value>,
    args7: Option<Value>,
) -> Result<(), TaskError> {
    let _ = [args0, args1, args2, args3, args4, args5, args6, args7];
    Err(TaskError::failed("ValueError", "deliberate error"))
}

/// `delayed_sum(numbers, pause_time=1)`: sleeps `pause_time` seconds, then `sum(numbers)`.
#[task(name = "t.integration.tasks.delayed_sum")]
fn delayed_sum(
    ctx: &TaskContext,
    numbers: Value,
    pause_time: Option<f64>,
) -> Result<Value, TaskError> {
    pause(ctx, pause_time.unwrap_or(1.0))?;
    python::sum(&numbers)
}

/// `delayed_sum_with_soft_guard(numbers, pause_time=1)`: as `delayed_sum`, but returns 0 if
/// the soft time limit passes during the pause.
#[task(name = "t.integration.tasks.delayed_sum_with_soft_guard")]
fn delayed_sum_with_soft_guard(
    ctx: &TaskContext,
    numbers: Value,
    pause_time: Option<f64>,
) -> Result<Value, TaskError> {
    match pause(ctx, pause_time.unwrap_or(1.0)) {
        Ok(()) => python::sum(&numbers),
        Err(_soft_time_limit_exceeded) => Ok(Value::from(0)),
    }
}

/// `tsum(nums)`: `sum(nums)`.
#[task(name = "t.integration.tasks.tsum")]
fn tsum(nums: Value) -> Result<Value, TaskError> {
    python::sum(&nums)
}

/// `xsum(nums)`: the sum of the numbers and of the sums of the iterables in `nums`.
#[task(name = "t.integration.tasks.xsum")]
fn xsum(nums: Value) -> Result<Value, TaskError> {
    iterate(&nums)?
        .iter()
        .try_fold(Value::from(0), |total, num| {
            let term = if is_iterable(num) {
                python::sum(num)?
            } else {
                num.clone()
            };
            python::add(&total, &term)
        })
}

/// `print_unicode(log_message='håå®ƒ valmuefrø', print_message='hiöäüß')`: logs the first
/// at warning level and prints the second.
#[task(name = "t.integration.tasks.print_unicode")]
fn print_unicode(ctx: &TaskContext, log_message: Option<String>, print_message: Option<String>) {
    ctx.warn(log_message.as_deref().unwrap_or("håå®ƒ valmuefrø"));
    println!("{}", print_message.as_deref().unwrap_or("hiöäüß"));
}

/// `return_exception(e)`: `(e, True)`.
#[task(name = "t.integration.tasks.return_exception")]
fn return_exception(e: Value) -> (Value, bool) {
    (e, true)
}

/// `sleeping(i, **_)`: sleeps `i` seconds and returns nothing. (The SDK refuses unknown
/// keyword arguments, which the Python task swallows; no test passes any.)
#[task(name = "t.integration.tasks.sleeping")]
fn sleeping(ctx: &TaskContext, i: f64) -> Result<(), TaskError> {
    pause(ctx, i)
}

/// `ids(i)`: `(root_id, parent_id, i)` of this call.
#[task(name = "t.integration.tasks.ids")]
fn ids(ctx: &TaskContext, i: Value) -> (Option<String>, Option<String>, Value) {
    (
        ctx.root_id().map(str::to_owned),
        ctx.parent_id().map(str::to_owned),
        i,
    )
}

/// `collect_ids(res, i)`: `(res, (root_id, parent_id, i))`.
#[task(name = "t.integration.tasks.collect_ids")]
fn collect_ids(
    ctx: &TaskContext,
    res: Value,
    i: Value,
) -> (Value, (Option<String>, Option<String>, Value)) {
    (
        res,
        (
            ctx.root_id().map(str::to_owned),
            ctx.parent_id().map(str::to_owned),
            i,
        ),
    )
}

/// `retry(return_value=None)`: retries every 5 s with `exc=ExpectedException()` — so it
/// fails with `ExpectedException` once the retries (3) are spent — unless `return_value` is
/// truthy, in which case the fourth attempt returns it.
///
/// The Python task counts its attempts in an attribute of the task object, state of the
/// worker process that runs every attempt (the suite's worker has one); the retry count is
/// the same number.
#[task(name = "t.integration.tasks.retry", default_retry_delay = "1s")]
fn retry(ctx: &TaskContext, return_value: Option<Value>) -> Result<Value, TaskError> {
    if let Some(value) = return_value.filter(truthy)
        && ctx.retries() >= 3
    {
        return Ok(value);
    }
    Err(TaskError::retry(exception_repr("ExpectedException", &[]))
        .after(Duration::from_secs(5))
        .or_fail_with(TaskError::raised(EXPECTED_EXCEPTION, ())))
}

/// `retry_unpickleable(foo, bar, *, retry_kwargs)`: retries with
/// `exc=UnpickleableException(foo, bar)` and `retry_kwargs` (`countdown`; the per-call
/// `max_retries` has no SDK counterpart, the task's default applies).
#[task(
    name = "t.integration.tasks.retry_unpickleable",
    default_retry_delay = "1s"
)]
// `foo` and `bar` are the Python task's parameter names, which keyword arguments use.
#[allow(clippy::disallowed_names)]
fn retry_unpickleable(foo: Value, bar: Value, retry_kwargs: Value) -> Result<(), TaskError> {
    let _ = bar; // UnpickleableException(foo, bar).args == (foo,)
    let request = TaskError::retry(exception_repr(
        "UnpickleableException",
        std::slice::from_ref(&foo),
    ))
    .or_fail_with(TaskError::raised(UNPICKLEABLE_EXCEPTION, [foo]));
    Err(
        match retry_kwargs.get("countdown").and_then(Value::as_f64) {
            Some(countdown) => request.after(seconds(countdown)),
            None => request,
        },
    )
}

/// `retry_once(*args, expires=None, max_retries=1, countdown=0.1)`: retries once, then
/// returns the number of retries. `expires` and `max_retries` per call have no SDK
/// counterpart (the task declares `max_retries=1`, the default of both).
#[task(name = "t.integration.tasks.retry_once", max_retries = 1)]
#[allow(clippy::too_many_arguments)]
fn retry_once(
    ctx: &TaskContext,
    args0: Option<Value>,
    args1: Option<Value>,
    args2: Option<Value>,
    args3: Option<Value>,
    args4: Option<Value>,
    args5: Option<Value>,
    args6: Option<Value>,
    args7: Option<Value>,
    expires: Option<f64>,
    max_retries: Option<u32>,
    countdown: Option<f64>,
) -> Result<u32, TaskError> {
    let _ = (
        [args0, args1, args2, args3, args4, args5, args6, args7],
        expires,
        max_retries,
    );
    if ctx.retries() > 0 {
        return Ok(ctx.retries());
    }
    Err(TaskError::retry("retry_once").after(seconds(countdown.unwrap_or(0.1))))
}

/// `retry_once_with_result()`: retries once at once, then returns the number of retries.
#[task(name = "t.integration.tasks.retry_once_with_result")]
fn retry_once_with_result(ctx: &TaskContext) -> Result<u32, TaskError> {
    if ctx.retries() == 0 {
        return Err(TaskError::retry("retry_once_with_result").after(Duration::ZERO));
    }
    Ok(ctx.retries())
}

/// `fail(*args)`: raises `ExpectedException("Task expected to fail", *args)`.
#[task(name = "t.integration.tasks.fail")]
#[allow(clippy::too_many_arguments)]
fn fail(
    args0: Option<Value>,
    args1: Option<Value>,
    args2: Option<Value>,
    args3: Option<Value>,
    args4: Option<Value>,
    args5: Option<Value>,
    args6: Option<Value>,
    args7: Option<Value>,
) -> Result<(), TaskError> {
    let mut args = vec![Value::from("Task expected to fail")];
    args.extend(variadic([
        args0, args1, args2, args3, args4, args5, args6, args7,
    ]));
    Err(TaskError::raised(EXPECTED_EXCEPTION, args))
}

/// `fail_unpickleable(foo, bar)`: raises `UnpickleableException(foo, bar)`, whose `args`
/// are `(foo,)` (and which cannot be rebuilt from them).
#[task(name = "t.integration.tasks.fail_unpickleable")]
#[allow(clippy::disallowed_names)]
fn fail_unpickleable(foo: Value, bar: Value) -> Result<(), TaskError> {
    let _ = bar;
    Err(TaskError::raised(UNPICKLEABLE_EXCEPTION, [foo]))
}

/// `reject_without_requeue()`: `Reject('rejected', requeue=False)`.
#[task(name = "t.integration.tasks.reject_without_requeue")]
fn reject_without_requeue() -> Result<(), TaskError> {
    Err(TaskError::reject("rejected"))
}

/// `AddParameterModel`, the pydantic model `add_pydantic` takes.
#[derive(Debug, Deserialize)]
struct AddParameterModel {
    x: i64,
    y: i64,
}

/// `AddResultModel`, the pydantic model `add_pydantic` returns (dumped to a dict).
#[derive(Debug, Serialize)]
struct AddResultModel {
    result: i64,
}

fn add_models(data: &AddParameterModel) -> Result<AddResultModel, TaskError> {
    let result = data.x.checked_add(data.y).ok_or_else(|| {
        TaskError::failed(
            "OverflowError",
            format!("{} + {} does not fit in 64 bits", data.x, data.y),
        )
    })?;
    Ok(AddResultModel { result })
}

/// `add_pydantic(data: AddParameterModel) -> AddResultModel`.
#[task(name = "t.integration.tasks.add_pydantic")]
fn add_pydantic(data: AddParameterModel) -> Result<AddResultModel, TaskError> {
    add_models(&data)
}

/// `add_pydantic_string_annotations(data: "AddParameterModel") -> "AddResultModel"`.
#[task(name = "t.integration.tasks.add_pydantic_string_annotations")]
fn add_pydantic_string_annotations(data: AddParameterModel) -> Result<AddResultModel, TaskError> {
    add_models(&data)
}

/// `ClassBasedAutoRetryTask` (`auto_retry_class_task`): raises `ValueError` on its first
/// attempt, retried automatically (`autoretry_for=(ValueError,)`, `max_retries=1`,
/// `retry_backoff=True`, with Celery's default jitter), then returns the number of retries.
#[task(
    name = "auto_retry_class_task",
    autoretry_for = ["ValueError"],
    max_retries = 1,
    retry_backoff = "1s",
    retry_jitter = true
)]
fn auto_retry_class_task(ctx: &TaskContext) -> Result<u32, TaskError> {
    if ctx.retries() > 0 {
        return Ok(ctx.retries());
    }
    Err(TaskError::failed("ValueError", ""))
}

/// The positional arguments of a `*args` parameter: up to the last one given.
fn variadic<const N: usize>(slots: [Option<Value>; N]) -> Vec<Value> {
    let given = slots
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |last| last + 1);
    slots
        .into_iter()
        .take(given)
        .map(|slot| slot.unwrap_or(Value::Null))
        .collect()
}

fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}

/// `time.sleep(seconds)` in a Celery worker: interrupted by `SoftTimeLimitExceeded` when the
/// task's soft time limit passes first.
fn pause(ctx: &TaskContext, seconds_: f64) -> Result<(), TaskError> {
    let deadline = Instant::now() + seconds(seconds_);
    loop {
        if ctx.should_stop() {
            return Err(TaskError::failed(
                "billiard.exceptions.SoftTimeLimitExceeded",
                "",
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        // Short naps, so the soft time limit is noticed within 10 ms.
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

wasmq_sdk::export_tasks!(
    identity,
    add,
    mul,
    add_not_typed,
    add_ignore_result,
    add_with_result,
    raise_error,
    delayed_sum,
    delayed_sum_with_soft_guard,
    tsum,
    xsum,
    print_unicode,
    return_exception,
    sleeping,
    ids,
    collect_ids,
    retry,
    retry_unpickleable,
    retry_once,
    retry_once_with_result,
    fail,
    fail_unpickleable,
    reject_without_requeue,
    add_pydantic,
    add_pydantic_string_annotations,
    auto_retry_class_task,
);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::variadic;

    #[test]
    fn variadic_keeps_arguments_up_to_the_last_given() {
        assert_eq!(
            variadic([None, None, None]),
            Vec::<serde_json::Value>::new()
        );
        assert_eq!(variadic([Some(json!(1)), None, None]), vec![json!(1)]);
        assert_eq!(
            variadic([None, Some(json!(2)), None]),
            vec![json!(null), json!(2)]
        );
    }
}
