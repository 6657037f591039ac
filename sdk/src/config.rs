//! Variables the worker granted to this call: named text values (an API endpoint, a
//! token) read through `wasi:config/store`, never through the environment.
//!
//! ```no_run
//! use wasmq_sdk::{config, task, TaskError};
//!
//! /// Says which endpoint this tenant's tasks call.
//! #[task]
//! fn endpoint() -> Result<String, TaskError> {
//!     config::get("API_URL")?
//!         .ok_or_else(|| TaskError::failed("KeyError", "the variable API_URL is not granted"))
//! }
//! # wasmq_sdk::export_tasks!(endpoint);
//! ```
//!
//! A call sees only the variables granted to it: a name that is not granted reads as
//! `None`, exactly like a name that does not exist. A plugin that never calls this module
//! does not import `wasi:config` at all.

use std::fmt;

use crate::TaskError;

#[doc(hidden)]
mod bindings {
    #![allow(missing_docs, unreachable_pub, unsafe_code, clippy::all)]
    wit_bindgen::generate!({
        path: "wit/config",
        world: "wasi:config/imports",
        runtime_path: "::wasmq_sdk::__private::wit_bindgen::rt",
    });
}

use bindings::wasi::config::store;

/// Why the worker could not answer (its source of values failed). A variable that is
/// simply not granted is not an error: it reads as `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The worker's source of values failed.
    Upstream(String),
    /// An I/O error while reading the values.
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Upstream(message) => write!(f, "the variable source failed: {message}"),
            Error::Io(message) => write!(f, "reading a variable failed: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// An `OSError` failure, so `?` works in a task.
impl From<Error> for TaskError {
    fn from(error: Error) -> Self {
        TaskError::failed("OSError", error.to_string())
    }
}

impl From<store::Error> for Error {
    fn from(error: store::Error) -> Self {
        match error {
            store::Error::Upstream(message) => Error::Upstream(message),
            store::Error::Io(message) => Error::Io(message),
        }
    }
}

/// The value of the variable `name`, or `None` when it is not granted to this call.
///
/// # Errors
/// [`Error`] when the worker could not answer.
pub fn get(name: &str) -> Result<Option<String>, Error> {
    store::get(name).map_err(Error::from)
}

/// Every variable granted to this call, as (name, value) pairs in no particular order.
///
/// # Errors
/// [`Error`] when the worker could not answer.
pub fn get_all() -> Result<Vec<(String, String)>, Error> {
    store::get_all().map_err(Error::from)
}
