//! [`ExclusiveLock`]: a mutex on RabbitMQ alone, and records written only by its holder
//! (the beat's lease when there is no Redis and no embedded database; the approach of
//! celery#1495).
//!
//! **The lock** is an exclusive queue: the first connection to declare it holds it; any
//! other declaring it gets 405 RESOURCE_LOCKED. RabbitMQ deletes an exclusive queue the
//! moment its connection closes, so a process that dies (even by SIGKILL, whose socket the
//! kernel closes) releases it at once, and a hung one when its heartbeats stop.
//!
//! **Records** are small messages kept in durable queues of length one (`x-max-length`: a new
//! record pushes the old one out), written with publisher confirms *on the holding
//! connection*, after checking the lock queue is still this connection's. A record the
//! broker confirmed was written while the writer held the lock; one written after it lost the
//! connection fails. The check and the write are two round trips: a lock queue deleted by
//! hand between them (nothing else deletes it while its connection lives) leaves that
//! window, the one gap against the Redis and SQLite leases.

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::lapin_error;
use crate::broker::BrokerError;

/// A mutex held as an exclusive queue; see the module docs.
pub struct ExclusiveLock {
    uri: String,
    /// The URI without credentials, for logs.
    shown: String,
    /// The lock queue.
    name: String,
    link: Mutex<Link>,
}

/// The lock's connection, and its confirm-mode channel while it holds the lock.
#[derive(Default)]
struct Link {
    connection: Option<Connection>,
    holding: Option<Channel>,
}

impl std::fmt::Debug for ExclusiveLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusiveLock")
            .field("broker", &self.shown)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The 404 or 405 RabbitMQ closes a channel with.
fn refused(error: &lapin::Error, code: AMQPSoftError) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(refusal)
            if matches!(refusal.kind(), AMQPErrorKind::Soft(soft) if *soft == code)
    )
}

fn record_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments
}

impl ExclusiveLock {
    /// The lock `name` on the broker at `uri`; nothing is connected until first use.
    ///
    /// # Errors
    /// [`BrokerError::UnsupportedUrl`] when the URI does not parse.
    pub fn new(uri: &str, name: &str) -> Result<Self, BrokerError> {
        let parsed: lapin::uri::AMQPUri = uri
            .parse()
            .map_err(|e| BrokerError::UnsupportedUrl(format!("{uri} ({e})")))?;
        Ok(Self {
            uri: uri.to_owned(),
            shown: format!(
                "amqp://{}:{}/{}",
                parsed.authority.host, parsed.authority.port, parsed.vhost
            ),
            name: name.to_owned(),
            link: Mutex::new(Link::default()),
        })
    }

    /// The broker and the lock queue, for logs.
    pub fn describe(&self) -> String {
        format!("{} (exclusive queue {})", self.shown, self.name)
    }

    /// The live connection, opening one if there is none (a new one holds nothing).
    async fn connection<'a>(&self, link: &'a mut Link) -> Result<&'a Connection, BrokerError> {
        if !link
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            link.holding = None;
            let properties = ConnectionProperties::default()
                .with_connection_name(format!("wasmq lock {}", self.name).into());
            let connection = Connection::connect(&self.uri, properties)
                .await
                .map_err(|e| lapin_error(&format!("cannot connect to {}", self.shown), &e))?;
            link.connection = Some(connection);
        }
        link.connection.as_ref().ok_or(BrokerError::Closed)
    }

    /// Takes the lock if no other connection holds it; true when this one holds it now.
    ///
    /// # Errors
    /// When RabbitMQ cannot be reached.
    pub async fn try_lock(&self) -> Result<bool, BrokerError> {
        let mut link = self.link.lock().await;
        if link
            .holding
            .as_ref()
            .is_some_and(|c| c.status().connected())
            && Self::owns(link.holding.as_ref(), &self.name).await?
        {
            return Ok(true);
        }
        let connection = self.connection(&mut link).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(self.name.as_str().into(), exclusive, FieldTable::default())
            .await
        {
            Ok(_) => {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| lapin_error("cannot enable publisher confirms", &e))?;
                link.holding = Some(channel);
                Ok(true)
            }
            Err(error) if refused(&error, AMQPSoftError::RESOURCELOCKED) => Ok(false),
            Err(error) => Err(lapin_error(
                &format!("cannot declare the lock queue {}", self.name),
                &error,
            )),
        }
    }

    /// Whether the lock queue exists and belongs to `holding`'s connection (a passive
    /// declare: 405 when another connection owns it, 404 when it is gone; either closes the
    /// channel, so the holder is then forgotten).
    async fn owns(holding: Option<&Channel>, name: &str) -> Result<bool, BrokerError> {
        let Some(channel) = holding else {
            return Ok(false);
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(error)
                if refused(&error, AMQPSoftError::RESOURCELOCKED)
                    || refused(&error, AMQPSoftError::NOTFOUND)
                    || !channel.status().connected() =>
            {
                Ok(false)
            }
            Err(error) => Err(lapin_error("cannot check the lock queue", &error)),
        }
    }

    /// Whether this process still holds the lock.
    ///
    /// # Errors
    /// When RabbitMQ fails in another way than saying no.
    pub async fn is_locked(&self) -> Result<bool, BrokerError> {
        let mut link = self.link.lock().await;
        let owns = Self::owns(link.holding.as_ref(), &self.name).await?;
        if !owns {
            link.holding = None;
        }
        Ok(owns)
    }

    /// Whether some connection (this one or another) holds the lock.
    ///
    /// # Errors
    /// When RabbitMQ cannot be reached.
    pub async fn is_held_anywhere(&self) -> Result<bool, BrokerError> {
        let mut link = self.link.lock().await;
        let connection = self.connection(&mut link).await?;
        let probe = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match probe
            .queue_declare(self.name.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(_) => {
                let _ = probe.close(200, "OK".into()).await;
                Ok(true)
            }
            Err(error) if refused(&error, AMQPSoftError::RESOURCELOCKED) => Ok(true),
            Err(error) if refused(&error, AMQPSoftError::NOTFOUND) => Ok(false),
            Err(error) => Err(lapin_error("cannot look up the lock queue", &error)),
        }
    }

    /// Gives the lock up (deletes the queue) if this process holds it.
    ///
    /// # Errors
    /// When RabbitMQ fails; the lock is released anyway when the connection closes.
    pub async fn unlock(&self) -> Result<(), BrokerError> {
        let mut link = self.link.lock().await;
        if let Some(channel) = link.holding.take() {
            channel
                .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| lapin_error("cannot delete the lock queue", &e))?;
            let _ = channel.close(200, "OK".into()).await;
        }
        Ok(())
    }

    /// Writes `body` as the one record in `queue`, only while this process holds the lock;
    /// false when it does not.
    ///
    /// # Errors
    /// When RabbitMQ fails or does not confirm the record.
    pub async fn write_record(&self, queue: &str, body: &[u8]) -> Result<bool, BrokerError> {
        let mut link = self.link.lock().await;
        if !Self::owns(link.holding.as_ref(), &self.name).await? {
            link.holding = None;
            return Ok(false);
        }
        let Some(channel) = link.holding.as_ref() else {
            return Ok(false);
        };
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.into(), durable, record_arguments())
            .await
            .map_err(|e| lapin_error(&format!("cannot declare {queue}"), &e))?;
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(|e| lapin_error("cannot write a record", &e))?
            .await
            .map_err(|e| lapin_error("a record was not confirmed", &e))?;
        match confirm {
            Confirmation::Nack(_) => Err(BrokerError::Refused(format!("a record for {queue}"))),
            _ => Ok(true),
        }
    }

    /// The record in `queue`, if any (read and put back).
    ///
    /// # Errors
    /// When RabbitMQ fails.
    pub async fn read_record(&self, queue: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        let mut link = self.link.lock().await;
        let connection = self.connection(&mut link).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("cannot open a channel", &e))?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.into(), durable, record_arguments())
            .await
            .map_err(|e| lapin_error(&format!("cannot declare {queue}"), &e))?;
        let got = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .map_err(|e| lapin_error(&format!("cannot read {queue}"), &e))?;
        let record = got.map(|message| {
            let tag = message.delivery.delivery_tag;
            (tag, message.delivery.data)
        });
        if let Some((tag, _)) = &record {
            let _ = channel
                .basic_nack(
                    *tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(record.map(|(_, data)| data))
    }
}
