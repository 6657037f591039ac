//! The control plane: a thread of its own running a one-thread async runtime, where a
//! worker serves remote control and sends its heartbeats.
//!
//! Task slots run guests on the worker's runtime. A guest yields at every epoch tick, but a
//! runtime whose threads are all busy polls the tasks woken from outside it (a command that
//! just arrived, a heartbeat's timer) only every few dozen polls: with every slot spinning,
//! each poll a 10 ms slice of guest code, `inspect ping` took most of a second. On the
//! control plane's own thread, the kernel schedules that work as soon as it wakes, so
//! `ping` answers in milliseconds and a worker whose slots are all busy never looks dead to
//! Flower.

use std::future::Future;

use tokio::sync::oneshot;

/// A running control plane; it stops when [`ControlPlane::stop`] is called or it is
/// dropped.
pub(super) struct ControlPlane {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl ControlPlane {
    /// Starts the thread and its runtime.
    pub(super) fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("wasmq-control".into())
            .spawn(move || {
                // Runs the spawned tasks until told to stop; dropping the runtime then
                // cancels what is left.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    /// Runs `future` on the control plane.
    pub(super) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// Stops the thread; what still runs on it is cancelled.
    pub(super) fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
