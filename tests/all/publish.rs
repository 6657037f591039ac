//! Publishing many tasks with a window of unconfirmed publishes (`Client::pipeline`, what
//! `wasmq send --bulk` uses) on RabbitMQ and on the embedded broker: every id handed back
//! is confirmed, every message arrives, in the order it was sent.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Map;
use wasmq::broker::Broker;
use wasmq::broker::amqp::AmqpBroker;
use wasmq::client::{Client, SendOptions};
use wasmq::protocol::TaskMessage;

use crate::support::{AMQP_URL, RABBITMQ, REDIS_URL, runtime, unique_queue};

/// Sends `n` tasks through a pipeline of `window` to `queue`, then reads them back.
async fn pipeline_round(broker: Arc<dyn Broker>, backend_url: &str, queue: &str, n: usize) {
    let backend = wasmq::results::connect(backend_url, Duration::from_secs(60), AMQP_URL).unwrap();
    let client = Client::new(Arc::clone(&broker), backend).with_default_queue(queue);
    let mut pipeline = client.pipeline(16);
    let mut confirmed = Vec::new();
    for i in 0..n {
        let options = SendOptions {
            ignore_result: Some(true),
            ..SendOptions::default()
        };
        let id = pipeline
            .send("math.add", vec![i.into(), 1.into()], Map::new(), options)
            .await
            .unwrap();
        confirmed.extend(id);
        assert!(pipeline.unconfirmed() <= 16, "the window is kept");
    }
    confirmed.extend(pipeline.finish().await.unwrap());
    assert_eq!(confirmed.len(), n, "every publish is confirmed once");
    assert_eq!(broker.queue_length(queue).await.unwrap(), n as u64);

    let mut consumer = broker.consume(&[queue.to_owned()], 64).await.unwrap();
    let mut arrived = Vec::new();
    while arrived.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("every message arrives")
            .unwrap();
        let message = TaskMessage::decode(&delivery.envelope).unwrap();
        arrived.push((message.id, message.args[0].as_u64().unwrap()));
        delivery.ack().await.unwrap();
    }
    consumer.close().await;
    let sent: Vec<(String, u64)> = confirmed.into_iter().zip(0..n as u64).collect();
    assert_eq!(
        arrived, sent,
        "in the order sent, under the ids handed back"
    );
}

#[test]
fn a_pipeline_on_rabbitmq_confirms_every_publish_and_keeps_their_order() {
    let _shared = RABBITMQ
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    runtime().block_on(async {
        let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::new(AMQP_URL).unwrap());
        let queue = unique_queue("pipeline");
        pipeline_round(Arc::clone(&broker), REDIS_URL, &queue, 2_000).await;
        broker.delete_queue(&queue).await.unwrap();
    });
}

#[test]
fn a_pipeline_on_the_embedded_broker_confirms_every_publish_and_keeps_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("wasmq.db").display());
    runtime().block_on(async {
        let broker = wasmq::broker::connect(&url).unwrap();
        pipeline_round(broker, &url, "pipeline", 2_000).await;
    });
}
