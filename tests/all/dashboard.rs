//! `wasmq dashboard` in a real browser: the binary serves the page, headless Chromium
//! (Debian's `chromium`) loads it, runs its script and dumps the DOM it built, and the DOM
//! must list the test's worker and the task sent during the test, with its state — on
//! RabbitMQ (events from `celeryev`, inspect replies) and on the embedded broker (the
//! database's events table, read back from before the dashboard started).
//!
//! Without Chromium the tests say "skipped: no chromium" and pass, unless
//! `WASMQ_REQUIRE_CHROMIUM` is set (`.ci/run` installs Chromium and sets it). With
//! `WASMQ_DASHBOARD_SCREENSHOT=FILE` the embedded test also saves a screenshot of the page.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpOptions;
use wasmq::client::SendOptions;
use wasmq::protocol::events::{Event, EventMessage};
use wasmq::worker::WorkerOptions;

use crate::semantics::Setup;
use crate::support::{AMQP_URL, Queue, RABBITMQ, bundled_registry, runtime, sandbox, spawn_worker};

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's `chromium` (or another Chromium on the PATH); `None` when there is none and
/// the tests may be skipped.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .flat_map(|dir| {
                ["chromium", "chromium-browser", "google-chrome"]
                    .into_iter()
                    .map(move |name| dir.join(name))
            })
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("WASMQ_REQUIRE_CHROMIUM").is_none(),
            "WASMQ_REQUIRE_CHROMIUM is set but no chromium is on the PATH"
        );
        eprintln!("skipped: no chromium (apt-get install chromium)");
    }
    found
}

/// Starts `wasmq dashboard` on a port the system chooses and returns it with its URL.
fn start_dashboard(args: &[&str], dir: &Path) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args(["dashboard", "--listen", "127.0.0.1:0", "--refresh", "500ms"])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start wasmq dashboard");
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let line = receiver
        .recv_timeout(Duration::from_secs(30))
        .expect("wasmq dashboard printed its address");
    let url = line
        .strip_prefix("dashboard: ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    (child, url)
}

/// `GET url` with a plain HTTP/1.1 request; the body.
fn get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(host).expect("connect to the dashboard");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The dashboard's JSON state, with the newest 1000 tasks that have `search` in them.
fn api_state(url: &str, search: &str) -> Value {
    serde_json::from_str(&get(&format!("{url}api/state?tasks=1000&search={search}")))
        .expect("JSON state")
}

/// Waits up to `within` for the state to satisfy `ready`; the last state seen.
async fn wait_for_state(
    url: &str,
    search: &str,
    within: Duration,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let state = api_state(url, search);
        if ready(&state) || tokio::time::Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn task<'a>(state: &'a Value, id: &str) -> Option<&'a Value> {
    state["tasks"].as_array()?.iter().find(|t| t["uuid"] == id)
}

fn worker<'a>(state: &'a Value, node: &str) -> Option<&'a Value> {
    state["workers"]
        .as_array()?
        .iter()
        .find(|w| w["hostname"] == node)
}

/// Publishes a probe heartbeat until the dashboard lists it: its event queue is then bound
/// and no event of what the test does next can be missed.
async fn until_listening(broker: &dyn Broker, url: &str) {
    let probe = format!("probe-dashboard@{}", std::process::id());
    for _ in 0..150 {
        let mut event = Event::new("worker-heartbeat", json!({"freq": 2.0, "active": 0}));
        event.stamp(&probe, chrono::Utc::now().timestamp() as f64, 1, 1);
        broker
            .publish_events(&EventMessage::single(event))
            .await
            .unwrap();
        let state = wait_for_state(url, "", Duration::from_millis(200), |s| {
            worker(s, &probe).is_some()
        })
        .await;
        if worker(&state, &probe).is_some() {
            return;
        }
    }
    panic!("the dashboard never heard an event");
}

/// The page as headless Chromium rendered it (after its script ran), and a screenshot when
/// `screenshot` names a file.
async fn render(chromium: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: Vec<String>| {
        let (chromium, url, profile) = (
            chromium.to_owned(),
            url.to_owned(),
            profile.path().to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            Command::new(chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--virtual-time-budget=5000",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(extra)
                .arg(url)
                .stderr(Stdio::null())
                .output()
                .expect("run chromium")
        })
    };
    let output = run(vec!["--dump-dom".into()]).await.unwrap();
    assert!(output.status.success(), "chromium failed: {output:?}");
    if let Some(path) = screenshot {
        let shot = run(vec![
            format!("--screenshot={}", path.display()),
            "--window-size=1280,1100".into(),
        ])
        .await
        .unwrap();
        assert!(shot.status.success(), "chromium --screenshot failed");
        eprintln!("screenshot: {}", path.display());
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `<tr>` of the rendered table `table` holding `needle`.
fn row<'a>(dom: &'a str, table: &str, needle: &str) -> Option<&'a str> {
    let start = dom.find(&format!("<table id=\"{table}\""))?;
    let table = &dom[start..start + dom[start..].find("</table>")?];
    let at = table.find(needle)?;
    let begin = table[..at].rfind("<tr")?;
    let end = at + table[at..].find("</tr>")?;
    Some(&table[begin..end])
}

#[test]
fn the_dashboard_lists_a_rabbitmq_worker_and_its_task_in_chromium() {
    let Some(chromium) = chromium() else {
        return;
    };
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let setup = Setup::rabbitmq("dashboard", AmqpOptions::default());
        let node = format!("wasmq-dashboard@{}", setup.queue);
        let dir = tempfile::tempdir().unwrap();
        // Other tests' workers share this RabbitMQ: --no-enable-events leaves them alone,
        // and a benchmark's thousands of tasks a second must not push ours out of memory.
        let (_dashboard, url) = start_dashboard(
            &[
                "--broker",
                AMQP_URL,
                "--queue",
                &setup.queue,
                "--no-enable-events",
                "--tasks",
                "1000000",
            ],
            dir.path(),
        );
        until_listening(setup.broker.as_ref(), &url).await;
        let running = setup
            .start(WorkerOptions {
                task_events: true,
                ..setup.options(&node)
            })
            .await;
        let add = setup
            .send("math.add", json!([2, 3]), SendOptions::default())
            .await;
        let div = setup
            .send("math.div", json!([1, 0]), SendOptions::default())
            .await;
        assert_eq!(add.get(Duration::from_secs(30)).await.unwrap(), json!(5));
        assert!(div.get(Duration::from_secs(30)).await.is_err());
        let finished = std::time::Instant::now();
        wait_for_state(&url, &node, Duration::from_secs(20), |s| {
            task(s, &div.id).is_some_and(|t| t["state"] == "FAILURE")
        })
        .await;
        eprintln!(
            "the dashboard showed the failure {:?} after the client had it",
            finished.elapsed()
        );
        let state = wait_for_state(&url, &node, Duration::from_secs(20), |s| {
            task(s, &add.id).is_some_and(|t| t["state"] == "SUCCESS")
                && task(s, &div.id).is_some_and(|t| t["state"] == "FAILURE")
                && worker(s, &node).is_some_and(|w| w["concurrency"] == 2)
        })
        .await;
        let shown = task(&state, &add.id).expect("the task in the state");
        assert_eq!(shown["result"], "5", "{shown:#}");
        assert_eq!(shown["args"], "(2, 3)", "{shown:#}");
        assert!(
            shown["runtime"].as_f64().is_some_and(|r| r > 0.0),
            "{shown:#}"
        );
        let me = worker(&state, &node).expect("the worker in the state");
        assert_eq!(me["online"], true, "{me:#}");
        assert_eq!(me["sw_ident"], "wasmq", "{me:#}");
        assert_eq!(me["concurrency"], 2, "inspect stats answered: {me:#}");
        assert_eq!(me["queues"], json!([setup.queue]), "active_queues: {me:#}");
        let queue = state["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == setup.queue.as_str())
            .expect("the test's queue");
        assert_eq!(queue["length"], 0, "{queue:#}");

        // The page's search (this test's node) keeps other tests' tasks off it.
        let dom = render(&chromium, &format!("{url}?search={node}"), None).await;
        assert!(
            dom.contains("data-rendered=\"1\""),
            "the script did not run:\n{dom}"
        );
        let worker_row =
            row(&dom, "workers", &node).unwrap_or_else(|| panic!("no worker row:\n{dom}"));
        assert!(worker_row.contains("online"), "{worker_row}");
        let task_row = row(&dom, "tasks", &add.id).unwrap_or_else(|| panic!("no task row:\n{dom}"));
        for needle in ["math.add", "SUCCESS", "(2, 3)", &node] {
            assert!(task_row.contains(needle), "{needle} missing: {task_row}");
        }
        let failed = row(&dom, "tasks", &div.id).unwrap_or_else(|| panic!("no failed row:\n{dom}"));
        assert!(
            failed.contains("FAILURE") && failed.contains("ZeroDivisionError"),
            "{failed}"
        );
        assert!(
            row(&dom, "queues", &setup.queue).is_some(),
            "no queue row:\n{dom}"
        );

        running.stop().await;
        let state = wait_for_state(&url, &node, Duration::from_secs(10), |s| {
            worker(s, &node).is_some_and(|w| w["online"] == false)
        })
        .await;
        assert_eq!(
            worker(&state, &node).map(|w| w["online"].clone()),
            Some(json!(false)),
            "a stopped worker shows offline"
        );
        setup.cleanup().await;
    });
}

#[test]
fn the_dashboard_reads_the_embedded_database_in_chromium() {
    let Some(chromium) = chromium() else {
        return;
    };
    runtime().block_on(async {
        let queue = Queue::new();
        let node = "wasmq-dashboard-embedded@test";
        let (stop, worker_task) = spawn_worker(
            &queue,
            bundled_registry(sandbox()).await,
            WorkerOptions {
                concurrency: 2,
                node_name: node.into(),
                task_events: true,
                heartbeat: Some(Duration::from_millis(500)),
                ..WorkerOptions::default()
            },
        );
        let send = |task: &'static str, args: Value, options: SendOptions| {
            let client = queue.client.clone();
            async move {
                client
                    .send_task(
                        task,
                        args.as_array().cloned().unwrap(),
                        serde_json::Map::new(),
                        options,
                    )
                    .await
                    .unwrap()
            }
        };
        // Sent and finished before the dashboard starts: it reads them from the database.
        let add = send("math.add", json!([20, 22]), SendOptions::default()).await;
        assert_eq!(add.get(Duration::from_secs(30)).await.unwrap(), json!(42));
        let (_dashboard, url) = start_dashboard(&["--broker", &queue.url], queue.dir.path());
        // One more while it watches, and one the sandbox stops at its time limit.
        let upper = send(
            "text.slugify",
            json!(["Hello Wasm"]),
            SendOptions::default(),
        )
        .await;
        let spin = send(
            "hostile.spin",
            json!([]),
            SendOptions {
                time_limit: Some(Duration::from_millis(200)),
                ..SendOptions::default()
            },
        )
        .await;
        assert_eq!(
            upper.get(Duration::from_secs(30)).await.unwrap(),
            json!("hello-wasm")
        );
        assert!(spin.get(Duration::from_secs(30)).await.is_err());
        let state = wait_for_state(&url, "", Duration::from_secs(20), |s| {
            task(s, &upper.id).is_some_and(|t| t["state"] == "SUCCESS")
                && task(s, &spin.id).is_some_and(|t| t["state"] == "FAILURE")
                // Polled every refresh: it may still show the tasks waiting at first.
                && s["queues"][0]["length"] == 0
        })
        .await;
        let before = task(&state, &add.id).expect("the task sent before the dashboard started");
        assert_eq!(before["state"], "SUCCESS", "{before:#}");
        assert_eq!(before["result"], "42", "{before:#}");
        let me = worker(&state, node).expect("the worker");
        assert_eq!(me["online"], true, "{me:#}");
        assert_eq!(me["limit_hits"], json!({"time": 1}), "{me:#}");
        assert_eq!(state["queues"][0]["name"], "celery", "{state:#}");
        assert_eq!(state["queues"][0]["length"], 0, "{state:#}");

        let screenshot = std::env::var_os("WASMQ_DASHBOARD_SCREENSHOT").map(PathBuf::from);
        let dom = render(&chromium, &url, screenshot.as_deref()).await;
        assert!(
            dom.contains("data-rendered=\"1\""),
            "the script did not run:\n{dom}"
        );
        let worker_row =
            row(&dom, "workers", node).unwrap_or_else(|| panic!("no worker row:\n{dom}"));
        assert!(
            worker_row.contains("online") && worker_row.contains("time 1"),
            "{worker_row}"
        );
        for (id, needles) in [
            (&add.id, ["math.add", "SUCCESS", "42"]),
            (&upper.id, ["text.slugify", "SUCCESS", "hello-wasm"]),
            (&spin.id, ["hostile.spin", "FAILURE", "TimeLimitExceeded"]),
        ] {
            let task_row =
                row(&dom, "tasks", id).unwrap_or_else(|| panic!("no row for {id}:\n{dom}"));
            for needle in needles {
                assert!(task_row.contains(needle), "{needle} missing: {task_row}");
            }
        }
        let _ = stop.send(());
        worker_task.await.unwrap();
    });
}
