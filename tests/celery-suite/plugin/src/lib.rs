//! The pure tasks of Celery 5.7.0's `t/integration/tasks.py`, ported to wasmq under their
//! Celery names (`t.integration.tasks.<name>`), so Celery's own integration suite can run
//! against a wasmq worker with the unmodified Python client.
//!
//! Each task keeps the Python task's parameter names, defaults, results, exception kinds
//! and task attributes (the `python` module supplies Python's `+`, `sum()`, `repr()`…):
//! `*args` is an `#[args]` parameter, `**kwargs` a `#[kwargs]` one, a parameter whose
//! Python default is not `None` but which a caller may set to `None` is an
//! `Option<Option<T>>`, `self.request` is the `TaskContext`, `self.retry(…)` is
//! `TaskError::retry(…)` with its builders and `Reject(requeue=True)` is
//! `TaskError::requeue`. What the port cannot say the same way, the task's doc comment
//! says.
//!
//! Not ported (the suite's tests that use them are deselected, see the README): tasks that
//! replace themselves, call Redis, call or build other tasks, or write files.

mod python;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use wasmq_sdk::{MessageProperties, TaskContext, TaskError, task};

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

/// `add_ignore_result(x, y)`: `x + y`, declared `ignore_result=True`.
#[task(name = "t.integration.tasks.add_ignore_result", ignore_result = true)]
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
fn raise_error(#[args] args: Vec<Value>) -> Result<(), TaskError> {
    let _ = args;
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

/// `sleeping(i, **_)`: sleeps `i` seconds and returns nothing, whatever keywords it gets.
#[task(name = "t.integration.tasks.sleeping")]
fn sleeping(
    ctx: &TaskContext,
    i: f64,
    #[kwargs] _kwargs: Map<String, Value>,
) -> Result<(), TaskError> {
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
/// `exc=UnpickleableException(foo, bar)` and `retry_kwargs` (`countdown`, `max_retries`,
/// `expires`).
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
    Err(retry_options(request, &retry_kwargs))
}

/// `self.retry(**retry_kwargs)`: the keywords a test passes through to `retry`.
fn retry_options(mut request: TaskError, retry_kwargs: &Value) -> TaskError {
    let number = |key| retry_kwargs.get(key).and_then(Value::as_f64);
    if let Some(countdown) = number("countdown") {
        request = request.after(seconds(countdown));
    }
    if let Some(expires) = number("expires") {
        request = request.expires(seconds(expires));
    }
    if let Some(max_retries) = retry_kwargs
        .get("max_retries")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
    {
        request = request.max_retries(max_retries);
    }
    request
}

/// `self.retry(countdown=countdown, expires=expires, max_retries=max_retries)` as the
/// `retry_once*` tasks call it: a `countdown` of `None` is the task's default retry delay,
/// a `max_retries` of `None` the task's limit, an `expires` of `None` no new expiry.
fn retry_with(
    reason: &str,
    countdown: Option<f64>,
    expires: Option<f64>,
    max_retries: Option<u32>,
) -> TaskError {
    let mut request = TaskError::retry(reason);
    if let Some(countdown) = countdown {
        request = request.after(seconds(countdown));
    }
    if let Some(expires) = expires {
        request = request.expires(seconds(expires));
    }
    if let Some(max_retries) = max_retries {
        request = request.max_retries(max_retries);
    }
    request
}

/// `retry_once(*args, expires=None, max_retries=1, countdown=0.1)`: retries once, then
/// returns the number of retries. (The Python task also declares `expires=120.0`, which a
/// Python client puts in the message itself.)
#[task(name = "t.integration.tasks.retry_once", max_retries = 1)]
fn retry_once(
    ctx: &TaskContext,
    #[args] args: Vec<Value>,
    expires: Option<f64>,
    max_retries: Option<Option<u32>>,
    countdown: Option<Option<f64>>,
) -> Result<u32, TaskError> {
    let _ = args;
    if ctx.retries() > 0 {
        return Ok(ctx.retries());
    }
    Err(retry_with(
        "retry_once",
        countdown.unwrap_or(Some(0.1)),
        expires,
        max_retries.unwrap_or(Some(1)),
    ))
}

/// `retry_once_priority(*args, expires=60.0, max_retries=1, countdown=0.1)`: retries once
/// (without `expires`, as the Python task), then returns its message's priority.
#[task(name = "t.integration.tasks.retry_once_priority", max_retries = 1)]
fn retry_once_priority(
    ctx: &TaskContext,
    #[args] args: Vec<Value>,
    expires: Option<Option<f64>>,
    max_retries: Option<Option<u32>>,
    countdown: Option<Option<f64>>,
) -> Result<Option<u8>, TaskError> {
    let _ = (args, expires);
    if ctx.retries() > 0 {
        return Ok(ctx.priority());
    }
    Err(retry_with(
        "retry_once_priority",
        countdown.unwrap_or(Some(0.1)),
        None,
        max_retries.unwrap_or(Some(1)),
    ))
}

/// `retry_once_headers(*args, max_retries=1, countdown=0.1)`: retries once, then returns
/// its custom headers (which the retry kept).
#[task(name = "t.integration.tasks.retry_once_headers", max_retries = 1)]
fn retry_once_headers(
    ctx: &TaskContext,
    #[args] args: Vec<Value>,
    max_retries: Option<Option<u32>>,
    countdown: Option<Option<f64>>,
) -> Result<Option<Map<String, Value>>, TaskError> {
    let _ = args;
    if ctx.retries() > 0 {
        return Ok(ctx.headers().cloned());
    }
    Err(retry_with(
        "retry_once_headers",
        countdown.unwrap_or(Some(0.1)),
        None,
        max_retries.unwrap_or(Some(1)),
    ))
}

/// `retry_once_ignore_result()`, declared `ignore_result=True`: retries once at once, then
/// returns the number of retries.
#[task(
    name = "t.integration.tasks.retry_once_ignore_result",
    ignore_result = true
)]
fn retry_once_ignore_result(ctx: &TaskContext) -> Result<u32, TaskError> {
    if ctx.retries() == 0 {
        return Err(TaskError::retry("retry_once_ignore_result").after(Duration::ZERO));
    }
    Ok(ctx.retries())
}

/// `retry_with_args_after_kwargs(foo, bar, label=None)` (`max_retries=1`): called with
/// keywords, retries with the positional arguments `(foo + 1, bar + 1)`; Celery keeps the
/// keywords they do not replace (`label`).
#[task(
    name = "t.integration.tasks.retry_with_args_after_kwargs",
    max_retries = 1
)]
#[allow(clippy::disallowed_names)]
fn retry_with_args_after_kwargs(
    ctx: &TaskContext,
    foo: Value,
    bar: Value,
    label: Option<Value>,
) -> Result<Value, TaskError> {
    if ctx.retries() == 0 {
        let one = Value::from(1);
        return Err(TaskError::retry("retry_with_args_after_kwargs")
            .after(Duration::ZERO)
            .args((python::add(&foo, &one)?, python::add(&bar, &one)?)));
    }
    Ok(json!({
        "foo": foo, "bar": bar, "label": label,
        "retries": ctx.retries(), "is_eager": false,
    }))
}

/// `retry_with_kwargs_after_args(foo, bar)` (`max_retries=1`): called positionally, retries
/// with the keyword `foo=foo + 1`, which replaces the positional `foo`.
#[task(
    name = "t.integration.tasks.retry_with_kwargs_after_args",
    max_retries = 1
)]
#[allow(clippy::disallowed_names)]
fn retry_with_kwargs_after_args(
    ctx: &TaskContext,
    foo: Value,
    bar: Value,
) -> Result<Value, TaskError> {
    if ctx.retries() == 0 {
        return Err(TaskError::retry("retry_with_kwargs_after_args")
            .after(Duration::ZERO)
            .kwargs(json!({"foo": python::add(&foo, &Value::from(1))?})));
    }
    // `is_eager` is always False on a worker.
    Ok(json!({"foo": foo, "bar": bar, "retries": ctx.retries(), "is_eager": false}))
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
fn fail(#[args] args: Vec<Value>) -> Result<(), TaskError> {
    let mut exception_args = vec![Value::from("Task expected to fail")];
    exception_args.extend(args);
    Err(TaskError::raised(EXPECTED_EXCEPTION, exception_args))
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

/// `reject_then_succeed()` (`acks_late=True`, wasmq's only way): `Reject(requeue=True)` on
/// the first delivery, `'second-pass'` once redelivered.
#[task(name = "t.integration.tasks.reject_then_succeed")]
fn reject_then_succeed(ctx: &TaskContext) -> Result<&'static str, TaskError> {
    if !ctx.redelivered() {
        return Err(TaskError::requeue("first delivery"));
    }
    Ok("second-pass")
}

/// `return_priority(*_args)`: `"Priority: %s" % request.delivery_info['priority']`.
#[task(name = "t.integration.tasks.return_priority")]
fn return_priority(ctx: &TaskContext, #[args] _args: Vec<Value>) -> String {
    match ctx.priority() {
        Some(priority) => format!("Priority: {priority}"),
        None => "Priority: None".to_owned(),
    }
}

/// `return_request_eta()`: `request.eta`.
#[task(name = "t.integration.tasks.return_request_eta")]
fn return_request_eta(ctx: &TaskContext) -> Option<String> {
    ctx.eta().map(str::to_owned)
}

/// `return_properties()`: `request.properties`.
#[task(name = "t.integration.tasks.return_properties")]
fn return_properties(ctx: &TaskContext) -> MessageProperties {
    ctx.properties().clone()
}

/// `{'time_limit': request.time_limit, 'soft_time_limit': request.soft_time_limit}`.
fn request_time_limits(ctx: &TaskContext) -> Value {
    json!({
        "time_limit": ctx.time_limit().map(python::seconds),
        "soft_time_limit": ctx.soft_time_limit().map(python::seconds),
    })
}

/// `return_request_time_limits()`: the time limits its message asked for.
#[task(name = "t.integration.tasks.return_request_time_limits")]
fn return_request_time_limits(ctx: &TaskContext) -> Value {
    request_time_limits(ctx)
}

/// `task_with_declared_time_limits()`, declared `time_limit=60, soft_time_limit=45`: the
/// time limits its message asked for (a Python client sends the declared ones unless the
/// call overrides them).
#[task(
    name = "t.integration.tasks.task_with_declared_time_limits",
    time_limit = "60s",
    soft_time_limit = "45s"
)]
fn task_with_declared_time_limits(ctx: &TaskContext) -> Value {
    request_time_limits(ctx)
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
    retry_once_priority,
    retry_once_headers,
    retry_once_ignore_result,
    retry_once_with_result,
    retry_with_args_after_kwargs,
    retry_with_kwargs_after_args,
    fail,
    fail_unpickleable,
    reject_without_requeue,
    reject_then_succeed,
    return_priority,
    return_request_eta,
    return_properties,
    return_request_time_limits,
    task_with_declared_time_limits,
    add_pydantic,
    add_pydantic_string_annotations,
    auto_retry_class_task,
);
