//! The one place where the host's bindings to `wit/task.wit` are generated.
//!
//! Exports are async (the guest runs on a fiber and yields at epoch ticks so it never pins an
//! executor thread); host imports are synchronous and trappable, so a host function can end a
//! call (for example when a guest exceeds a hostcall data cap).

#![allow(missing_docs, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "task-plugin",
    imports: { default: trappable },
    exports: { default: async },
});

pub(crate) use self::wasmq::task::types;
