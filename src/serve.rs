//! Serving HTTP on accepted connections, with the timeouts `axum::serve` has no setting for.
//!
//! This is `axum::serve` written out (hyper-util's connection builder on each accepted
//! connection, upgrades for WebSockets, graceful shutdown) so that the builder can be given a
//! timer: a client that sends part of a request's headers and nothing more, or opens a
//! connection and never speaks, is closed after [`HEADER_READ_TIMEOUT`] instead of holding a
//! descriptor forever; so is a keep-alive connection idle for as long. And each connection's
//! writes have a timeout ([`WriteTimeout`]): a client that stops reading a response is closed.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    time::Sleep,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Layer;

/// How long a client may take to send a request's headers, and how long a keep-alive
/// connection may wait idle for the next request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Kernel send buffer of each accepted connection, in bytes (Linux doubles it for its own
/// bookkeeping). A burst of chat frames fits many times over; a browser that stops reading then
/// holds little in the kernel (whose socket memory counts against the pod's limit too), and the
/// process stops writing to it early instead of pushing megabytes into its socket.
const SOCKET_SEND_BUFFER: usize = 64 * 1024;
/// How long to wait before accepting again after the listener failed (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets each open connection
/// finish its request in flight (graceful shutdown) and resolves once they are all closed.
/// The client's address reaches handlers as [`ConnectInfo<SocketAddr>`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    write_timeout: Duration,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: the next accept may succeed once descriptors are
                    // freed; a busy loop would not help.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(SOCKET_SEND_BUFFER) {
            tracing::debug!(error = %e, "cannot set the socket's send buffer");
        }
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(router.clone()));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let io = TokioIo::new(WriteTimeout::new(tcp, write_timeout));
            let connection = builder.serve_connection_with_upgrades(io, service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => log_end(result, peer),
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    log_end(connection.await, peer);
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn log_end(result: Result<(), Box<dyn std::error::Error + Send + Sync>>, peer: SocketAddr) {
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// A connection whose writes fail once the peer has taken nothing for `timeout`: a client
/// that asks and never reads does not hold its response, nor its descriptor, forever. Any
/// progress starts the wait again. WebSocket sessions have their own, shorter send timeout;
/// this one is behind it.
pub struct WriteTimeout<T> {
    io: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteTimeout<T> {
    pub fn new(io: T, timeout: Duration) -> Self {
        Self { io, timeout, stalled: None }
    }

    /// What a write's outcome becomes: progress clears the wait; a pending write starts it, or
    /// fails once the peer has been stalled for the whole timeout.
    fn progressed<R>(&mut self, result: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match result {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                stalled.as_mut().poll(cx).map(|()| {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "the client took nothing for too long"))
                })
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
