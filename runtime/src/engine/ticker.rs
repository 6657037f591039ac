//! The epoch ticker: one thread that advances the engine's epoch every tick, so each running
//! guest reaches its epoch deadline, yields to the executor and has its time limit checked.
//! It ticks only while at least one store is alive ([`EpochTicker::hold`], kept in the
//! store's state) and is parked otherwise: an idle worker is not woken a hundred times a
//! second. Stores' deadlines are relative to the epoch when they are set and time limits are
//! checked against the clock, so a pause while no store exists changes nothing a guest sees.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use wasmtime::Engine;

#[derive(Debug, Default)]
struct State {
    /// Stores alive now.
    stores: usize,
    /// The sandbox is being dropped.
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The ticker thread and what it waits on.
#[derive(Debug)]
pub(crate) struct EpochTicker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Keeps the ticker ticking while it lives (one per store).
#[derive(Debug)]
pub(crate) struct TickerHold {
    shared: Arc<Shared>,
}

impl EpochTicker {
    /// Starts the thread, parked until the first [`EpochTicker::hold`].
    pub(crate) fn start(engine: Engine, tick: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let ticking = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("wasmq-epoch".to_owned())
            .spawn(move || {
                loop {
                    {
                        let mut state =
                            ticking.state.lock().unwrap_or_else(PoisonError::into_inner);
                        while state.stores == 0 && !state.stop {
                            state = ticking
                                .wake
                                .wait(state)
                                .unwrap_or_else(PoisonError::into_inner);
                        }
                        if state.stop {
                            return;
                        }
                    }
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Ticks until the returned hold is dropped (with every other hold).
    pub(crate) fn hold(&self) -> TickerHold {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.stores += 1;
        if state.stores == 1 {
            self.shared.wake.notify_one();
        }
        TickerHold {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for TickerHold {
    fn drop(&mut self) {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.stores = state.stores.saturating_sub(1);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
