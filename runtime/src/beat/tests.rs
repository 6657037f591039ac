//! The loop's decisions on a real embedded database: which runs fire when a beat starts
//! after runs were missed, and that two beats in one process send each run once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::lease::embedded::EmbeddedLease;
use super::lease::{Acquired, LeaseStore};
use super::{Beat, BeatOptions, Occurrence, Schedule, When};
use crate::broker::Broker;
use crate::client::Client;

struct Fixture {
    _dir: tempfile::TempDir,
    url: String,
    broker: Arc<dyn Broker>,
    store: Arc<EmbeddedLease>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmq.db");
        let url = format!("sqlite://{}", path.display());
        Self {
            broker: crate::broker::connect(&url).unwrap(),
            store: Arc::new(EmbeddedLease::open(&path, "test").unwrap()),
            url,
            _dir: dir,
        }
    }

    fn beat(&self, schedule: &str) -> Beat {
        let backend =
            crate::results::connect(&self.url, Duration::from_secs(60), &self.url).unwrap();
        let client = Client::new(Arc::clone(&self.broker), backend);
        let options = BeatOptions {
            lease_ttl: Duration::from_secs(1),
            ..BeatOptions::default()
        };
        let store: Arc<dyn LeaseStore> = self.store.clone();
        Beat::new(
            Schedule::from_toml("test", schedule).unwrap(),
            client,
            store,
            options,
        )
    }

    /// The ids waiting in `queue`.
    async fn ids(&self, queue: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let length = self.broker.queue_length(queue).await.unwrap();
        if length == 0 {
            return ids;
        }
        let mut consumer = self.broker.consume(&[queue.to_owned()], 100).await.unwrap();
        for _ in 0..length {
            let delivery = consumer.next().await.unwrap();
            ids.push(delivery.envelope.headers["id"].as_str().unwrap().to_owned());
            delivery.ack().await.unwrap();
        }
        ids
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A daily entry last run three days ago fires once, for its latest instant, with
/// `catch_up = "one"`; with `"none"` the missed runs are skipped; an entry never run does not
/// fire for instants before the beat first saw it.
#[test]
fn missed_runs_fire_once_unless_catch_up_is_none() {
    let fixture = Fixture::new();
    runtime().block_on(async {
        let daily = When::every(Duration::from_secs(86_400));
        let latest = daily.latest_at_or_before(Utc::now()).unwrap();
        let long_ago = latest - chrono::Duration::days(3);
        let store = &fixture.store;
        assert_eq!(
            store
                .acquire("earlier", Duration::from_secs(60))
                .await
                .unwrap(),
            Acquired::Held
        );
        for entry in ["catch", "skip"] {
            let old = Occurrence::new(entry, long_ago);
            store.claim("earlier", &old, &old.task_id()).await.unwrap();
        }
        store.release("earlier").await.unwrap();
        let beat = fixture.beat(
            r#"
            [beat.catch]
            task = "math.add"
            every = "1day"
            queue = "catch"
            [beat.skip]
            task = "math.add"
            every = "1day"
            queue = "skip"
            catch_up = "none"
            [beat.fresh]
            task = "math.add"
            every = "1day"
            queue = "fresh"
            "#,
        );
        let stats = beat
            .run(tokio::time::sleep(Duration::from_millis(800)))
            .await;
        assert_eq!(
            fixture.ids("catch").await,
            [Occurrence::new("catch", latest).task_id()],
            "the latest missed run, once"
        );
        assert!(fixture.ids("skip").await.is_empty());
        assert!(fixture.ids("fresh").await.is_empty());
        assert_eq!((stats.sent, stats.skipped, stats.terms), (1, 1, 1));
        let runs = store.last_runs(&[]).await.unwrap();
        assert_eq!(runs["catch"].at, latest);
        assert_eq!(runs["catch"].runs, 2);
        assert_eq!(runs["skip"].at, long_ago, "a skipped run is not claimed");
        assert!(store.holder().await.unwrap().is_none(), "released on stop");
    });
}

/// Two beats of one process share a store: one leads, and each second is sent once with
/// its derived id.
#[test]
fn two_beats_in_one_process_send_each_second_once() {
    let fixture = Fixture::new();
    runtime().block_on(async {
        let schedule = "[beat.tick]\ntask = \"math.add\"\nevery = \"1s\"\nqueue = \"tick\"";
        let started: DateTime<Utc> = Utc::now();
        let stop = tokio_util::sync::CancellationToken::new();
        let one = tokio::spawn(fixture.beat(schedule).run(stop.clone().cancelled_owned()));
        let two = tokio::spawn(fixture.beat(schedule).run(stop.clone().cancelled_owned()));
        // Stop half-way between two runs, after the fourth.
        let last = started.timestamp() + 4;
        let stop_at = DateTime::from_timestamp(last, 500_000_000).unwrap();
        tokio::time::sleep((stop_at - Utc::now()).to_std().unwrap()).await;
        stop.cancel();
        let (one, two) = (one.await.unwrap(), two.await.unwrap());
        assert_eq!(one.terms + two.terms, 1, "{one:?} {two:?}");
        let ids = fixture.ids("tick").await;
        let expected: Vec<String> = (started.timestamp() + 1..=last)
            .map(|s| Occurrence::new("tick", DateTime::from_timestamp(s, 0).unwrap()).task_id())
            .collect();
        assert_eq!(ids, expected, "each second once, in order");
        assert_eq!(one.sent + two.sent, ids.len() as u64);
    });
}
