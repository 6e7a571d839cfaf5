//! The app's receivers: WebSocket sessions, each waiting for its `welcome` frame, each frame
//! handed to the shared bookkeeping.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use futures_util::{StreamExt, stream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{
    OPEN_CONCURRENCY, STEP_TIMEOUT,
    message::now_ns,
    receivers::{Fleet, Opened, Receiver, Totals},
    server::Server,
};

/// Opens `n` WebSocket sessions, `OPEN_CONCURRENCY` at a time, each waiting for its welcome.
pub async fn open_sessions(server: &Server, n: usize) -> (Fleet, BTreeMap<String, usize>) {
    let totals = Arc::new(Totals::default());
    let cancel = CancellationToken::new();
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let opened: Vec<Opened> = stream::iter(0..n)
        .map(|_| {
            let (url, totals, cancel) = (url.clone(), totals.clone(), cancel.clone());
            async move {
                let (mut ws, _) = tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(url))
                    .await
                    .map_err(|_| "handshake timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                match tokio::time::timeout(STEP_TIMEOUT, ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.contains("\"type\":\"welcome\"") => {}
                    Ok(other) => return Err(format!("first frame not a welcome: {other:?}")),
                    Err(_) => return Err("no welcome frame".into()),
                }
                let receiver = Receiver::new(totals);
                let task = tokio::spawn(read_session(ws, receiver.clone(), cancel));
                Ok((receiver, task))
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    Fleet::gather(opened, totals, cancel)
}

pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One session's reader: every text frame goes to the receiver's bookkeeping.
pub async fn read_session(mut ws: WebSocket, receiver: Arc<Receiver>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                return;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => receiver.on_frame(text.as_str(), now_ns()),
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    receiver.totals.closed_early.fetch_add(1, Relaxed);
                    return;
                }
                // Pings are answered by tungstenite on the next read.
                Some(Ok(_)) => {}
            },
        }
    }
}
