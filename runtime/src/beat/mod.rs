//! Beat: periodic tasks (Celery's `celery beat`), safe to run on every worker.
//!
//! A beat reads a schedule file ([`schedule`]: entries that fire `every = "10s"` or on a
//! `cron` pattern in a time zone, see [`when`]) and sends each entry's task when it is due,
//! through the [`Client`](crate::client::Client) like any other sender — so the message is a
//! plain Celery protocol-v2 task that wasmq and Python Celery workers both run.
//!
//! Any number of beats may run with one schedule: they elect a leader with a **lease**, and
//! the leader **claims each occurrence** — the entry and its scheduled instant — with a
//! compare-and-set before sending it ([`lease`]). Only the first claim of an occurrence
//! succeeds, and only while its claimer holds the lease, so no occurrence is sent twice
//! even when two beats believe they lead. A leader that loses its lease (it expired, or was
//! deleted) steps down and follows; it never crashes. A follower retries when the lease is
//! due to expire, so a dead leader's work resumes within the lease's time to live.
//!
//! Each occurrence's task id is derived from the entry's name and the instant
//! ([`Occurrence::task_id`]), so every beat would send it under the same id and a duplicate
//! would be visible as one. A claimed occurrence is sent once (the claim comes first): if the
//! broker refuses it three times it is logged as lost rather than risk a second send.
//!
//! The schedule file is checked for changes every second; a changed file is reloaded, and a
//! file that no longer validates is logged and ignored (the previous schedule runs on).
//!
//! * [`schedule`] — the file format and its validation;
//! * [`when`] — `every` and `cron`, the first occurrence after an instant, DST;
//! * [`occurrence`] — an occurrence's id and jitter;
//! * [`lease`] — the lease and the claims, in Redis or the embedded database file;
//! * `run.rs` — [`Beat`]: the leader/follower loop.

pub mod lease;
pub mod occurrence;
mod run;
pub mod schedule;
#[cfg(test)]
mod tests;
pub mod when;

pub use self::lease::{Claim, LastRun, LeaseError, LeaseStore};
pub use self::occurrence::Occurrence;
pub use self::run::{Beat, BeatOptions, BeatStats};
pub use self::schedule::{CatchUp, Entry, Schedule, ScheduleError};
pub use self::when::When;
