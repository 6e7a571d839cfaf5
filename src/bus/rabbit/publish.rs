//! Publishing to the exchange, confirmed by the broker: a message is only reported accepted
//! (202) once the broker has confirmed it, within `publish_timeout`.

use std::time::SystemTime;

use lapin::{BasicProperties, Confirmation, options::BasicPublishOptions, types::ShortString};

use super::RabbitBus;
use crate::{bus::BusError, chat::Envelope};

impl RabbitBus {
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let link = self.ready_link()?;
        let config = &self.0.config;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(envelope.id.as_str().into())
            .with_timestamp(unix_now())
            .with_app_id("fanout-chat".into())
            // Persistent, for the durable queues other services may bind; the sessions'
            // own queues are transient and ignore it.
            .with_delivery_mode(2);
        let body = envelope.to_json();
        let confirmed = tokio::time::timeout(config.publish_timeout, async {
            link.publisher
                .basic_publish(
                    config.exchange.as_str().into(),
                    ShortString::from(""),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await?
                .await
        })
        .await;
        let result = match confirmed {
            Ok(Ok(Confirmation::Ack(_))) => Ok(()),
            Ok(Ok(Confirmation::Nack(_))) => Err(BusError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(BusError::Broker("publisher confirms are off".into())),
            Ok(Err(e)) => {
                if !link.publisher.status().connected() {
                    // The channel is gone (a channel error): nothing more can be published on
                    // this link, so have the supervisor build a new one.
                    link.broken.notify_one();
                }
                Err(BusError::Broker(e.to_string()))
            }
            Err(_) => Err(BusError::Timeout(config.publish_timeout)),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, id = %envelope.id, "publish failed");
        }
        result
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
