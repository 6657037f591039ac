//! The bundled plugins, built for `wasm32-wasip2` by this crate's build script from
//! `plugins/`, as paths to their `.wasm` components: `MATH`, `TEXT`, `HOSTILE`, `ALL`, `DIR`.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
