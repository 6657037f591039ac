//! Links the plugin with a 128 KiB shadow stack, as the bundled plugins do (see
//! `plugins/math/build.rs`): the worker resets a task's memory after every task, and a small
//! stack keeps that cheap. The ported tasks recurse only through `repr` of nested JSON.
fn main() {
    println!("cargo::rustc-link-arg-cdylib=-zstack-size=131072");
}
