//! The one place where the host's bindings to the WIT contract are generated: the current
//! version (`wit/task.wit`) and the previous one a worker keeps serving
//! (`wit/previous/task-0.2.0.wit`). `contract.rs` puts the two behind one interface.
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

/// `wasmq:task@0.2.0`: plugins built before failures carried their arguments.
pub(crate) mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit/previous/task-0.2.0.wit",
        world: "task-plugin",
        imports: { default: trappable },
        exports: { default: async },
    });

    pub(crate) use self::wasmq::task::types;
}
