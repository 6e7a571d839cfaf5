//! The broker: AMQP connections, and deleting what a run declared.

use lapin::{
    Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
};

use crate::{AMQP_URL, STEP_TIMEOUT};

pub async fn connect_amqp(name: &str) -> Connection {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(STEP_TIMEOUT, Connection::connect(AMQP_URL, properties))
        .await
        .expect("an AMQP connection within 30 s")
        .expect("RabbitMQ at 127.0.0.1:5672 (guest/guest)")
}

pub async fn delete_exchange(connection: &Connection, exchange: &str) {
    if let Ok(channel) = connection.create_channel().await {
        let deleted = channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default());
        match tokio::time::timeout(STEP_TIMEOUT, deleted).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("  warning: could not delete exchange {exchange}: {e}"),
            Err(_) => eprintln!("  warning: deleting exchange {exchange} timed out"),
        }
    }
}

/// Deletes a queue: here, a durable history stream, which would otherwise stay on the broker
/// (up to 100 MB each) after the run.
pub async fn delete_queue(connection: &Connection, queue: &str) {
    if let Ok(channel) = connection.create_channel().await {
        let deleted = channel.queue_delete(queue.into(), QueueDeleteOptions::default());
        match tokio::time::timeout(STEP_TIMEOUT, deleted).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("  warning: could not delete queue {queue}: {e}"),
            Err(_) => eprintln!("  warning: deleting queue {queue} timed out"),
        }
    }
}
