//! The plugins that ship inside the `wasmq` binary, built from `plugins/` by the build
//! script: `math`, `text`, `hostile`, `grants` and `stamp` (which says which build ran it, for deploys). The demo runs them, and `wasmq plugins export DIR`
//! writes them out for a worker's plugin folder. `cpu` (the workloads of `wasmq bench cpu`) is
//! embedded for the bench but left out of [`ALL`].

include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));
