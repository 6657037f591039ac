//! `math`: small arithmetic tasks, the "hello world" of wasmq.

use wasmq_sdk::{TaskError, task};

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

wasmq_sdk::export_tasks!(add, mul, fib, sum, div);
