//! What is declared on the broker: the durable fanout exchange and exclusive, bound queues, and
//! how a refused declare (a channel error) is told from a lost connection.

use lapin::{
    Channel, Connection, ErrorKind, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::FieldTable,
};

/// Declares an exclusive, auto-delete queue and binds it to `exchange` with `routing_key`.
pub(super) async fn declare_exclusive_bound(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
    exchange: &str,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    channel.queue_declare(queue.into(), options, arguments).await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Declares the exchange durable. If one of that name exists with other properties, it is used
/// as it is, with a warning: another team may own it, and refusing to start helps nobody.
pub(super) async fn declare_exchange(connection: &Connection, name: &str) -> Result<(), lapin::Error> {
    // A channel of its own: a refused declare closes the channel it was made on.
    let channel = connection.create_channel().await?;
    let declared = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await;
    match declared {
        Err(e) if channel_error(&e) == Some(&AMQPSoftError::PRECONDITIONFAILED) => {
            // The failed declare closed that channel; check existence on a fresh one.
            let probe = connection.create_channel().await?;
            probe
                .exchange_declare(
                    name.into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            let _ = probe.close(200, "OK".into()).await;
            tracing::warn!(
                exchange = name, error = %e,
                "the exchange exists with other properties than a durable fanout; using it as it is"
            );
            Ok(())
        }
        Ok(()) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The kind of a soft AMQP error: one that closes a channel, not the connection.
pub(super) fn channel_error(error: &lapin::Error) -> Option<&AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(kind) => Some(kind),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}
