//! Per-call grants: a task reaches a host folder, an outbound TCP address or a variable
//! only when its call is granted it, and every attempt beyond a grant — `..`, absolute host
//! paths, symlinks into another tenant's folder, writes to a read-only folder, the broker's
//! port, a catch-all rule aimed at loopback, listening, name lookups, ungranted variables —
//! ends as one failed call with a precise reason while the same sandbox keeps serving.
//! Also the tenant's layer of limits. Real plugins (`grants`, `hostile`, `math`), real
//! folders and real sockets on 127.0.0.1.
//!
//! Each call prints `task(args) → outcome`: `cargo test --test all grants:: -- --nocapture`
//! shows what every attack got back.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use wasmq::engine::{
    CallError, CallRequest, DirGrant, GrantError, Grants, LimitKind, LimitOverrides, Limits,
    NetworkGrant, NetworkRule, Outcome, Plugin, Sandbox, SandboxConfig, TaskFailure, TenantLimits,
};

use crate::support::{GRANTS, HOSTILE, MATH, load, runtime, success};

/// One sandbox with the three plugins the tests use.
struct Fixture {
    sandbox: Sandbox,
    grants: Plugin,
    hostile: Plugin,
    math: Plugin,
}

impl Fixture {
    async fn new() -> Self {
        Self::with_config(SandboxConfig {
            cache_dir: None,
            ..SandboxConfig::default()
        })
        .await
    }

    async fn with_config(config: SandboxConfig) -> Self {
        let sandbox = Sandbox::new(config).expect("sandbox");
        let grants = load(&sandbox, GRANTS).await;
        let hostile = load(&sandbox, HOSTILE).await;
        let math = load(&sandbox, MATH).await;
        Self {
            sandbox,
            grants,
            hostile,
            math,
        }
    }

    fn plugin(&self, task: &str) -> &Plugin {
        match task.split('.').next() {
            Some("hostile") => &self.hostile,
            Some("math") => &self.math,
            _ => &self.grants,
        }
    }

    /// Runs `task(args)` with `grants`, prints how it ended, and checks that the sandbox
    /// still serves a normal call right after.
    async fn run(&self, task: &str, args: Value, grants: &Grants) -> Outcome {
        let mut request = CallRequest::new(task, args.to_string());
        request.grants = grants.clone();
        let outcome = self
            .sandbox
            .call(self.plugin(task), request)
            .await
            .unwrap_or_else(|e| panic!("{task}({args}) did not start: {e}"))
            .outcome;
        eprintln!("{task}({args}) → {outcome}");
        self.still_serving().await;
        outcome
    }

    async fn still_serving(&self) {
        assert_eq!(
            success(&self.sandbox, &self.math, "math.add", "[1, 2]").await,
            3,
            "the sandbox stopped serving"
        );
    }

    /// `task(args)` succeeds; its result.
    async fn ok(&self, task: &str, args: Value, grants: &Grants) -> Value {
        match self.run(task, args.clone(), grants).await {
            Outcome::Success(json) => serde_json::from_str(&json).expect("a JSON result"),
            other => panic!("{task}({args}) should succeed: {other}"),
        }
    }

    /// `task(args)` fails as `kind`, with a message containing `fragment`.
    async fn denied(
        &self,
        task: &str,
        args: Value,
        grants: &Grants,
        kind: &str,
        fragment: &str,
    ) -> TaskFailure {
        match self.run(task, args.clone(), grants).await {
            Outcome::Failed(failure) => {
                assert_eq!(failure.kind, kind, "{task}({args}): {}", failure.message);
                assert!(
                    failure.message.contains(fragment),
                    "{task}({args}): {:?} lacks {fragment:?}",
                    failure.message
                );
                failure
            }
            other => panic!("{task}({args}) was not denied: {other}"),
        }
    }
}

fn folder(dir: &Path, guest: &str, writable: bool) -> Grants {
    Grants {
        dirs: vec![DirGrant {
            host: dir.to_path_buf(),
            guest: guest.to_owned(),
            writable,
        }],
        ..Grants::default()
    }
}

fn network(rules: &[&str], dns: bool) -> Grants {
    Grants {
        network: NetworkGrant {
            allow: rules
                .iter()
                .map(|r| r.parse::<NetworkRule>().unwrap())
                .collect(),
            dns,
        },
        ..Grants::default()
    }
}

/// The names in a host folder, sorted.
fn host_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn without_a_folder_grant_there_is_no_filesystem() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let none = Grants::default();
        let failure = f
            .denied(
                "grants.read_text",
                json!(["/data/in.txt"]),
                &none,
                "FileNotFoundError",
                "cannot read /data/in.txt: ",
            )
            .await;
        assert!(
            failure.message.contains("No such file or directory"),
            "{}",
            failure.message
        );
        f.denied(
            "grants.list_dir",
            json!(["/"]),
            &none,
            "FileNotFoundError",
            "cannot list /: ",
        )
        .await;
        f.denied(
            "grants.write_text",
            json!(["/data/out.txt", "x"]),
            &none,
            "FileNotFoundError",
            "cannot write /data/out.txt: ",
        )
        .await;
        f.denied(
            "hostile.read_outside",
            json!(["/etc/passwd"]),
            &none,
            "FileNotFoundError",
            "cannot read /etc/passwd: ",
        )
        .await;
    });
}

#[test]
fn a_read_only_folder_is_read_and_never_changed() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.txt"), "hello from the host").unwrap();
        let ro = folder(dir.path(), "/data", false);

        let text = f.ok("grants.read_text", json!(["/data/in.txt"]), &ro).await;
        assert_eq!(text, "hello from the host");
        let names = f.ok("grants.list_dir", json!(["/data"]), &ro).await;
        assert_eq!(names, json!(["in.txt"]));

        f.denied(
            "grants.write_text",
            json!(["/data/in.txt", "overwritten"]),
            &ro,
            "PermissionError",
            "cannot write /data/in.txt: ",
        )
        .await;
        f.denied(
            "grants.write_text",
            json!(["/data/new.txt", "created"]),
            &ro,
            "PermissionError",
            "cannot write /data/new.txt: ",
        )
        .await;
        // Truncate, append, create beside, rename, remove: every one refused.
        let failure = f
            .denied(
                "hostile.write_readonly",
                json!(["/data/in.txt"]),
                &ro,
                "PermissionError",
                "cannot change /data/in.txt (truncate: ",
            )
            .await;
        for step in ["append: ", "create beside: ", "rename: ", "remove: "] {
            assert!(failure.message.contains(step), "{}", failure.message);
        }

        assert_eq!(
            std::fs::read_to_string(dir.path().join("in.txt")).unwrap(),
            "hello from the host",
            "the host file changed"
        );
        assert_eq!(host_names(dir.path()), ["in.txt"], "a file appeared");
    });
}

#[test]
fn a_writable_folder_is_written_and_the_host_sees_it() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let dir = tempfile::tempdir().unwrap();
        let rw = folder(dir.path(), "/data", true);
        let written = f
            .ok(
                "grants.write_text",
                json!(["/data/out.txt", "written by the task"]),
                &rw,
            )
            .await;
        assert_eq!(written, 19);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
            "written by the task"
        );
        // And in a fresh call (a fresh Store), the task reads it back.
        let text = f
            .ok("grants.read_text", json!(["/data/out.txt"]), &rw)
            .await;
        assert_eq!(text, "written by the task");
        // The same folder granted read-only to another call is read-only there.
        let ro = folder(dir.path(), "/data", false);
        f.denied(
            "grants.write_text",
            json!(["/data/out.txt", "again"]),
            &ro,
            "PermissionError",
            "cannot write /data/out.txt: ",
        )
        .await;
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
            "written by the task"
        );
    });
}

#[test]
fn no_path_leads_out_of_a_granted_folder() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        // Tenant A's folder `a` (granted read-write at /data) beside tenant B's folder `b`.
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        const SECRET: &str = "tenant B's secret";
        std::fs::write(b.join("secret.txt"), SECRET).unwrap();
        std::fs::write(a.join("mine.txt"), "tenant A's file").unwrap();
        // Symlinks planted on the host in A's folder: absolute and relative, to B's folder
        // and to B's file, and one that stays inside A's folder.
        use std::os::unix::fs::symlink;
        symlink(&b, a.join("abs_dir")).unwrap();
        symlink("../b", a.join("rel_dir")).unwrap();
        symlink(b.join("secret.txt"), a.join("abs_file")).unwrap();
        symlink("../b/secret.txt", a.join("rel_file")).unwrap();
        symlink("mine.txt", a.join("inner")).unwrap();
        let rw = folder(&a, "/data", true);

        // The grant works, and a symlink that stays inside it is followed.
        let mine = f
            .ok("grants.read_text", json!(["/data/mine.txt"]), &rw)
            .await;
        assert_eq!(mine, "tenant A's file");
        let inner = f.ok("grants.read_text", json!(["/data/inner"]), &rw).await;
        assert_eq!(inner, "tenant A's file");

        let b_secret = b.join("secret.txt").display().to_string();
        let reads = [
            "/data/../b/secret.txt".to_owned(),
            "/data/../../etc/passwd".to_owned(),
            "/data/..".to_owned(),
            b_secret.clone(),
            b.display().to_string(),
            "/data/abs_dir/secret.txt".to_owned(),
            "/data/rel_dir/secret.txt".to_owned(),
            "/data/abs_file".to_owned(),
            "/data/rel_file".to_owned(),
            "/data/abs_file/".to_owned(),
            "/data/rel_file/".to_owned(),
            "/data/abs_dir".to_owned(),
            "/data/rel_dir".to_owned(),
            "/data/abs_dir/".to_owned(),
            "/data/rel_dir/".to_owned(),
        ];
        for path in &reads {
            match f.run("hostile.read_outside", json!([path]), &rw).await {
                Outcome::Failed(failure) => {
                    // Inside the grant: refused by the host (EPERM). An absolute host path
                    // names no granted folder, so for the task it does not exist.
                    let kind = if path.starts_with("/data") {
                        "PermissionError"
                    } else {
                        "FileNotFoundError"
                    };
                    assert_eq!(failure.kind, kind, "{path}: {}", failure.message);
                    assert!(
                        failure.message.contains(&format!("cannot read {path}: ")),
                        "{path}: {}",
                        failure.message
                    );
                    assert!(!failure.message.contains(SECRET));
                }
                other => panic!("{path} was read: {other}"),
            }
        }
        // Writes through the same paths.
        for path in [
            "/data/../b/planted.txt",
            "/data/abs_dir/planted.txt",
            "/data/rel_dir/planted.txt",
            "/data/abs_file",
            "/data/rel_file",
            "/data/rel_dir/",
        ] {
            match f
                .run("grants.write_text", json!([path, "owned"]), &rw)
                .await
            {
                Outcome::Failed(failure) => assert!(
                    failure.message.contains(&format!("cannot write {path}: ")),
                    "{path}: {}",
                    failure.message
                ),
                other => panic!("{path} was written: {other}"),
            }
        }
        // Symlinks planted from inside the sandbox, then followed.
        for (link, target, then_read) in [
            ("/data/made_rel", "../b", "secret.txt"),
            ("/data/made_abs", b.to_str().unwrap(), "secret.txt"),
            ("/data/made_file", "../b/secret.txt", ""),
            ("/data/made_guest", "/data/../b", "secret.txt"),
        ] {
            match f
                .run(
                    "hostile.follow_symlink",
                    json!([link, target, then_read]),
                    &rw,
                )
                .await
            {
                Outcome::Failed(failure) => {
                    assert!(
                        failure.message.contains("cannot read"),
                        "{}",
                        failure.message
                    );
                    assert!(!failure.message.contains(SECRET));
                }
                other => panic!("{link} -> {target} was followed: {other}"),
            }
        }

        assert_eq!(
            host_names(&b),
            ["secret.txt"],
            "a file appeared in B's folder"
        );
        assert_eq!(
            std::fs::read_to_string(b.join("secret.txt")).unwrap(),
            SECRET
        );
    });
}

/// A line-echo server on 127.0.0.1 that counts the connections it accepted.
struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&accepted), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        let mut line = String::new();
                        let mut reader = BufReader::new(stream.try_clone().unwrap());
                        if reader.read_line(&mut line).is_ok() {
                            let mut stream = stream;
                            let _ = stream.write_all(format!("echo: {line}").as_bytes());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A port nothing listens on (just released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn without_a_network_grant_nothing_connects() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let server = EchoServer::start();
        let addr = server.addr.to_string();
        f.denied(
            "grants.tcp_request",
            json!([addr, "ping"]),
            &Grants::default(),
            "PermissionError",
            &format!("cannot connect to {addr}: "),
        )
        .await;
        // A grant of folders or variables only grants no network either.
        let dir = tempfile::tempdir().unwrap();
        f.denied(
            "grants.tcp_request",
            json!([addr, "ping"]),
            &folder(dir.path(), "/data", true),
            "PermissionError",
            &format!("cannot connect to {addr}: "),
        )
        .await;
        assert_eq!(server.accepted(), 0, "a connection reached the server");
    });
}

#[test]
fn a_rule_that_names_an_address_reaches_it_and_nothing_else() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let server = EchoServer::start();
        let other = EchoServer::start();
        let addr = server.addr.to_string();
        let granted = network(&[&addr], false);

        let answer = f
            .ok("grants.tcp_request", json!([addr, "ping"]), &granted)
            .await;
        assert_eq!(answer, "echo: ping");
        assert_eq!(server.accepted(), 1);

        // The broker stays blocked under the same grant (hostile.connect: 127.0.0.1:5672).
        f.denied(
            "hostile.connect",
            json!([]),
            &granted,
            "ConnectionRefusedError",
            "cannot connect to 127.0.0.1:5672: ",
        )
        .await;
        // Another port on the same address, the same port on IPv6 loopback.
        let other_addr = other.addr.to_string();
        f.denied(
            "grants.tcp_request",
            json!([other_addr, "ping"]),
            &granted,
            "PermissionError",
            &format!("cannot connect to {other_addr}: "),
        )
        .await;
        let v6 = format!("[::1]:{}", server.addr.port());
        match f
            .run("grants.tcp_request", json!([v6, "ping"]), &granted)
            .await
        {
            Outcome::Failed(failure) => assert!(
                failure
                    .message
                    .contains(&format!("cannot connect to {v6}: ")),
                "{}",
                failure.message
            ),
            other => panic!("{v6} was reached: {other}"),
        }
        assert_eq!(other.accepted(), 0);
        assert_eq!(server.accepted(), 1);
    });
}

#[test]
fn a_catch_all_rule_never_reaches_loopback() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let server = EchoServer::start();
        let everything = network(&["0.0.0.0/0:*", "[::/0]:*"], false);
        let port = server.addr.port();
        for (addr, kind, reason) in [
            (
                server.addr.to_string(),
                "PermissionError",
                "Permission denied",
            ),
            (
                format!("127.0.0.2:{port}"),
                "PermissionError",
                "Permission denied",
            ),
            // Connecting to 0.0.0.0 reaches the host itself on Linux: refused as well
            // (wasmtime-wasi rejects an unspecified remote address before the check).
            (format!("0.0.0.0:{port}"), "OSError", "Invalid argument"),
        ] {
            f.denied(
                "grants.tcp_request",
                json!([addr, "ping"]),
                &everything,
                kind,
                &format!("cannot connect to {addr}: {reason}"),
            )
            .await;
        }
        f.denied(
            "hostile.connect",
            json!([]),
            &everything,
            "ConnectionRefusedError",
            "cannot connect to 127.0.0.1:5672: ",
        )
        .await;
        assert_eq!(server.accepted(), 0, "a catch-all reached loopback");
    });
}

#[test]
fn binding_and_listening_are_always_denied() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let port = free_port();
        for grants in [
            Grants::default(),
            network(&[&format!("127.0.0.1:{port}"), "0.0.0.0/0:*"], true),
            network(&["127.0.0.0/8:*"], false),
        ] {
            let failure = f
                .denied(
                    "hostile.bind_listen",
                    json!([port]),
                    &grants,
                    "PermissionError",
                    &format!("cannot listen (127.0.0.1:{port}: "),
                )
                .await;
            assert!(
                failure.message.contains("; 0.0.0.0:0: "),
                "{}",
                failure.message
            );
        }
        // Nothing listens on the port.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    });
}

#[test]
fn name_lookups_only_with_the_dns_grant() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        // wasi:sockets answers access-denied; wasi-libc's getaddrinfo reports it as
        // EAI_FAIL, which Rust's std words as below.
        for grants in [Grants::default(), network(&["0.0.0.0/0:443"], false)] {
            f.denied(
                "grants.resolve",
                json!(["localhost"]),
                &grants,
                "OSError",
                "cannot resolve localhost: failed to lookup address information: \
                 Non-recoverable error",
            )
            .await;
        }
        let ips = f
            .ok("grants.resolve", json!(["localhost"]), &network(&[], true))
            .await;
        let ips: Vec<&str> = ips
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip.as_str().unwrap())
            .collect();
        assert!(
            ips.contains(&"127.0.0.1") || ips.contains(&"::1"),
            "{ips:?}"
        );
        // Resolving reaches nothing by itself: connecting still needs a rule.
        let server = EchoServer::start();
        let by_name = format!("localhost:{}", server.addr.port());
        match f
            .run(
                "grants.tcp_request",
                json!([by_name, "ping"]),
                &network(&[], true),
            )
            .await
        {
            Outcome::Failed(failure) => assert!(
                failure
                    .message
                    .contains(&format!("cannot connect to {by_name}: ")),
                "{}",
                failure.message
            ),
            other => panic!("{by_name} was reached: {other}"),
        }
        assert_eq!(server.accepted(), 0);
    });
}

#[test]
fn a_host_name_rule_reaches_what_the_worker_resolves_the_name_to() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let server = EchoServer::start();
        let other = EchoServer::start();
        let port = server.addr.port();
        // `localhost` resolves (on the worker) to loopback: the rule names it.
        let granted = network(&[&format!("localhost:{port}")], true);
        for target in [server.addr.to_string(), format!("localhost:{port}")] {
            let answer = f
                .ok("grants.tcp_request", json!([target, "ping"]), &granted)
                .await;
            assert_eq!(answer, "echo: ping", "{target}");
        }
        assert_eq!(server.accepted(), 2);
        // Only its port: another port of the same host, and the broker, stay refused.
        let other_addr = other.addr.to_string();
        f.denied(
            "grants.tcp_request",
            json!([other_addr, "ping"]),
            &granted,
            "PermissionError",
            &format!("cannot connect to {other_addr}: "),
        )
        .await;
        f.denied(
            "hostile.connect",
            json!([]),
            &granted,
            "ConnectionRefusedError",
            "cannot connect to 127.0.0.1:5672: ",
        )
        .await;
        assert_eq!(other.accepted(), 0);
        assert_eq!(server.accepted(), 2);
    });
}

#[test]
fn variables_are_served_only_as_granted_and_never_as_environment() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        const TOKEN: &str = "s3cr3t-token-value";
        let granted = Grants {
            variables: [
                ("API_URL".to_owned(), "https://api.example.com".to_owned()),
                ("API_TOKEN".to_owned(), TOKEN.to_owned()),
            ]
            .into(),
            ..Grants::default()
        };
        assert_eq!(
            f.ok("grants.variable", json!(["API_URL"]), &granted).await,
            "https://api.example.com"
        );
        assert_eq!(
            f.ok("grants.variable", json!(["API_TOKEN"]), &granted)
                .await,
            TOKEN
        );
        assert_eq!(
            f.ok("grants.variable", json!(["OTHER_TENANT_TOKEN"]), &granted)
                .await,
            Value::Null,
            "an ungranted name reads as None"
        );
        f.denied(
            "hostile.read_variable",
            json!(["OTHER_TENANT_TOKEN"]),
            &granted,
            "KeyError",
            "no variable OTHER_TENANT_TOKEN is served",
        )
        .await;
        // A call without the grant sees none of them.
        assert_eq!(
            f.ok("grants.variable", json!(["API_TOKEN"]), &Grants::default())
                .await,
            Value::Null
        );
        f.denied(
            "hostile.read_variable",
            json!(["API_TOKEN"]),
            &Grants::default(),
            "KeyError",
            "no variable API_TOKEN is served",
        )
        .await;
        // They are never in the task's environment.
        let failure = f
            .denied(
                "hostile.read_env",
                json!([]),
                &granted,
                "KeyError",
                "no environment visible",
            )
            .await;
        assert!(!failure.message.contains(TOKEN));
        // And the request's Debug output (what a log line would show) hides the values.
        let mut request = CallRequest::new("grants.variable", "[]");
        request.grants = granted.clone();
        let shown = format!("{request:?}");
        assert!(
            shown.contains("API_TOKEN") && !shown.contains(TOKEN),
            "{shown}"
        );
    });
}

#[test]
fn grants_that_cannot_be_given_fail_the_call_before_it_starts() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.txt");
        std::fs::write(&file, "x").unwrap();
        let cases = [
            (
                folder(&dir.path().join("missing"), "/data", false),
                "the granted folder",
            ),
            (folder(&file, "/data", false), "is not a folder"),
            (folder(dir.path(), "data", false), "must be absolute"),
            (
                Grants {
                    dirs: vec![
                        DirGrant::read_only(dir.path(), "/data"),
                        DirGrant::writable(dir.path(), "/data"),
                    ],
                    ..Grants::default()
                },
                "same guest path",
            ),
        ];
        for (grants, fragment) in cases {
            let mut request = CallRequest::new("grants.read_text", r#"["/data/file.txt"]"#);
            request.grants = grants;
            let error = f.sandbox.call(&f.grants, request).await.unwrap_err();
            eprintln!("grants.read_text with a bad grant → {error}");
            assert!(matches!(error, CallError::Grant(_)), "{error}");
            let message = error.to_string();
            assert!(
                message.starts_with("cannot give the task its grants: "),
                "{message}"
            );
            assert!(message.contains(fragment), "{message}");
            f.still_serving().await;
        }
        let missing = GrantError::NotADirectory { host: file.clone() };
        assert!(missing.to_string().contains(&file.display().to_string()));
    });
}

#[test]
fn only_plugins_that_read_variables_import_wasi_config() {
    // Every plugin loads (the fixture loads math, grants and hostile into a sandbox that
    // links wasi:config); only those that call `wasmq_sdk::config` import it.
    runtime().block_on(async {
        let f = Fixture::new().await;
        f.still_serving().await;
        assert!(!f.grants.tasks().is_empty());
    });
    let imports = |path: &str| {
        let bytes = std::fs::read(path).unwrap();
        let needle = b"wasi:config/store@0.2.0-rc.1";
        bytes.windows(needle.len()).any(|w| w == needle)
    };
    assert!(!imports(MATH), "math.wasm imports wasi:config");
    assert!(imports(GRANTS), "grants.wasm does not import wasi:config");
    assert!(imports(HOSTILE), "hostile.wasm does not import wasi:config");
}

#[test]
fn the_tenant_layer_sets_defaults_and_a_lower_ceiling() {
    runtime().block_on(async {
        let f = Fixture::new().await;
        let tenant = TenantLimits {
            defaults: LimitOverrides {
                fuel: Some(3_000_000_000),
                memory_bytes: Some(8 << 20),
                timeout: Some(Duration::from_secs(20)),
            },
            ceiling: Limits {
                fuel: 2_000_000_000,
                memory_bytes: 32 << 20,
                timeout: Duration::from_secs(2),
            },
        };
        let with_tenant = |task: &str, limits: LimitOverrides| {
            let mut request = CallRequest::new(task, "[]");
            request.limits = limits;
            request.tenant_limits = Some(tenant);
            request
        };

        // The caller asks for more than the tenant may have: the tenant's ceiling clamps.
        let greedy = LimitOverrides {
            fuel: Some(u64::MAX),
            memory_bytes: Some(512 << 20),
            timeout: Some(Duration::from_secs(600)),
        };
        let request = with_tenant("hostile.hog", greedy);
        let limits = f.sandbox.limits_for(&f.hostile, &request).unwrap();
        assert_eq!(limits, tenant.ceiling);
        let report = f.sandbox.call(&f.hostile, request).await.unwrap();
        eprintln!("hostile.hog under the tenant ceiling → {}", report.outcome);
        assert_eq!(report.limits, limits, "the call runs under limits_for");
        assert!(
            matches!(&report.outcome, Outcome::LimitExceeded(l) if l.kind == LimitKind::Memory),
            "{}",
            report.outcome
        );
        assert_eq!(
            report.outcome.to_string(),
            "exceeded its memory limit (32 MiB)"
        );
        f.still_serving().await;

        // Fuel: the tenant's ceiling.
        let report = f
            .sandbox
            .call(&f.hostile, with_tenant("hostile.spin", greedy))
            .await
            .unwrap();
        eprintln!("hostile.spin under the tenant ceiling → {}", report.outcome);
        assert_eq!(
            report.outcome.to_string(),
            "ran out of CPU time (budget 200ms of CPU = 2000000000 fuel)"
        );
        f.still_serving().await;

        // Time: a tenant whose ceiling is 300 ms of wall time, with all the fuel it wants.
        let mut request = with_tenant("hostile.spin", greedy);
        request.tenant_limits = Some(TenantLimits {
            ceiling: Limits {
                fuel: u64::MAX,
                timeout: Duration::from_millis(300),
                ..tenant.ceiling
            },
            ..tenant
        });
        let report = f.sandbox.call(&f.hostile, request).await.unwrap();
        eprintln!(
            "hostile.spin under a 300 ms tenant ceiling → {}",
            report.outcome
        );
        assert_eq!(
            report.outcome.to_string(),
            "exceeded its time limit (300ms)"
        );
        f.still_serving().await;

        // The tenant's defaults apply where neither the caller nor the plugin says.
        let request = with_tenant("math.add", LimitOverrides::default());
        let limits = f.sandbox.limits_for(&f.math, &request).unwrap();
        assert_eq!(
            limits,
            Limits {
                fuel: 2_000_000_000, // the tenant's default 3e9, over its ceiling
                memory_bytes: 8 << 20,
                timeout: Duration::from_secs(2), // the default 20 s, over the ceiling
            }
        );
        let mut request = request;
        request.args_json = "[2, 3]".to_owned();
        let report = f.sandbox.call(&f.math, request).await.unwrap();
        assert_eq!(report.outcome, Outcome::Success("5".to_owned()));
        assert_eq!(report.limits.memory_bytes, 8 << 20);
        // A plugin's declaration beats the tenant's default (math.budgeted: time_limit 5s),
        // and is still clamped by the tenant's ceiling.
        let mut relaxed = tenant;
        relaxed.ceiling.timeout = Duration::from_secs(60);
        let mut request = CallRequest::new("math.budgeted", "[1]");
        request.tenant_limits = Some(relaxed);
        let limits = f.sandbox.limits_for(&f.math, &request).unwrap();
        assert_eq!(limits.timeout, Duration::from_secs(5));
        // Without a tenant, the worker's defaults, as before.
        let limits = f
            .sandbox
            .limits_for(&f.math, &CallRequest::new("math.add", "[1, 2]"))
            .unwrap();
        assert_eq!(limits, f.sandbox.config().defaults);
        // An unknown task is an error, as for `call`.
        let error = f
            .sandbox
            .limits_for(&f.math, &CallRequest::new("math.nope", "[]"))
            .unwrap_err();
        assert!(matches!(error, CallError::UnknownTask { .. }), "{error}");
    });
}

#[test]
fn the_worker_ceiling_stays_below_a_generous_tenant() {
    runtime().block_on(async {
        let f = Fixture::with_config(SandboxConfig {
            cache_dir: None,
            ceiling: Limits {
                fuel: u64::MAX,
                memory_bytes: 64 << 20,
                timeout: Duration::from_secs(3600),
            },
            ..SandboxConfig::default()
        })
        .await;
        let mut request = CallRequest::new("hostile.hog", "[]");
        request.tenant_limits = Some(TenantLimits {
            defaults: LimitOverrides {
                memory_bytes: Some(256 << 20),
                ..LimitOverrides::default()
            },
            ceiling: Limits {
                fuel: u64::MAX,
                memory_bytes: 512 << 20,
                timeout: Duration::from_secs(10),
            },
        });
        request.limits.fuel = Some(5_000_000_000);
        let limits = f.sandbox.limits_for(&f.hostile, &request).unwrap();
        assert_eq!(limits.memory_bytes, 64 << 20);
        let report = f.sandbox.call(&f.hostile, request).await.unwrap();
        assert_eq!(
            report.outcome.to_string(),
            "exceeded its memory limit (64 MiB)"
        );
        f.still_serving().await;
    });
}
