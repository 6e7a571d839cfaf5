//! A TCP proxy of the tests' own, between the app and the broker, that can break the link on
//! demand (after rust-lang/crates.io's `ChaosProxy`).
//!
//! It listens on a free loopback port and forwards every connection to the upstream address.
//! [`ChaosProxy::cut`] closes every current connection at once and refuses new ones (accepted,
//! then closed at once) until [`ChaosProxy::restore`]; [`ChaosProxy::stall`] keeps connections
//! open but forwards no byte in either direction (a silent network: only heartbeats or
//! timeouts notice it) until [`ChaosProxy::restore`]. [`ChaosProxy::stall_connection`] does
//! the same to one connection, by the order it was accepted in (the app opens its publishing
//! connection first, then its consumer connections). Every task watches the proxy's `watch`
//! channel: when the proxy is dropped, its sender goes, and every task ends.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::helpers::within;

/// How long the proxy waits for the upstream to accept a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bytes flow both ways.
    Forward,
    /// Bytes from the client reach the server; nothing comes back until the mode changes (a
    /// confirm lost on its way).
    Deaf,
    /// Connections stay open; no byte moves until the mode changes.
    Stall,
    /// Every connection is closed; new ones are closed as soon as they are accepted.
    Cut,
}

pub struct ChaosProxy {
    address: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections currently proxied (both sockets open).
    live: Arc<watch::Sender<usize>>,
    counts: Arc<Counts>,
    /// The mode of each forwarded connection of its own, in the order accepted.
    connections: Connections,
}

type Connections = Arc<Mutex<Vec<watch::Sender<Mode>>>>;

impl ChaosProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) that forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the chaos proxy");
        let address = listener.local_addr().expect("the chaos proxy's address");
        let (mode, watcher) = watch::channel(Mode::Forward);
        let live = Arc::new(watch::Sender::new(0));
        let counts = Arc::new(Counts::default());
        let connections = Connections::default();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            watcher,
            live.clone(),
            counts.clone(),
            connections.clone(),
        ));
        Self { address, mode, live, counts, connections }
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Connections forwarded so far (accepted while not cut).
    pub fn forwarded(&self) -> u64 {
        self.counts.forwarded.load(Relaxed)
    }

    /// Connections refused (closed at once) while cut.
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Relaxed)
    }

    /// Connections open through the proxy right now.
    pub fn live(&self) -> usize {
        *self.live.borrow()
    }

    /// Closes every current connection and refuses new ones until [`Self::restore`]. Returns
    /// once every proxied connection is closed.
    pub async fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
        let mut live = self.live.subscribe();
        within("the chaos proxy to close every connection", live.wait_for(|&n| n == 0))
            .await
            .expect("the proxy's connection count");
    }

    /// Keeps connections open but forwards nothing, either way, until [`Self::restore`].
    pub async fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
        // Let every pump see the change before anyone relies on it.
        tokio::task::yield_now().await;
    }

    /// Stalls only the `index`th connection accepted (from 0), until [`Self::restore_connection`].
    pub async fn stall_connection(&self, index: usize) {
        self.set_connection(index, Mode::Stall).await;
    }

    /// Lets the `index`th connection's bytes reach the server, but none come back.
    pub async fn deafen_connection(&self, index: usize) {
        self.set_connection(index, Mode::Deaf).await;
    }

    /// Closes the `index`th connection (both sockets), as a node that went away would.
    pub async fn cut_connection(&self, index: usize) {
        self.set_connection(index, Mode::Cut).await;
    }

    pub async fn restore_connection(&self, index: usize) {
        self.set_connection(index, Mode::Forward).await;
    }

    async fn set_connection(&self, index: usize, mode: Mode) {
        self.connections.lock().unwrap()[index].send_replace(mode);
        tokio::task::yield_now().await;
    }

    /// Forwards again: stalled connections carry on with what they held, new ones are accepted.
    pub async fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
        tokio::task::yield_now().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    live: Arc<watch::Sender<usize>>,
    counts: Arc<Counts>,
    connections: Connections,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = mode.changed() => match changed {
                Ok(()) => continue,
                // The proxy was dropped.
                Err(_) => return,
            },
        };
        let Ok((client, _)) = accepted else { continue };
        // Counted as live before the mode is read, so a `cut` that starts meanwhile waits for it.
        live.send_modify(|n| *n += 1);
        let guard = LiveGuard(live.clone());
        if *mode.borrow() == Mode::Cut {
            // Refused: the peer sees its connection closed before any byte comes back.
            drop(client);
            drop(guard);
            counts.refused.fetch_add(1, Relaxed);
            continue;
        }
        counts.forwarded.fetch_add(1, Relaxed);
        let (own, own_watcher) = watch::channel(Mode::Forward);
        connections.lock().unwrap().push(own);
        let (effective, effective_watcher) = watch::channel(Mode::Forward);
        tokio::spawn(combine(mode.clone(), own_watcher, effective));
        tokio::spawn(proxy_connection(client, upstream, effective_watcher, guard));
    }
}

/// Keeps one connection's mode the stricter of the proxy's and its own (Cut over Stall over
/// Forward). Ends, ending the connection's pumps, when the proxy is dropped.
async fn combine(
    mut proxy: watch::Receiver<Mode>,
    mut own: watch::Receiver<Mode>,
    effective: watch::Sender<Mode>,
) {
    let strictness = |m: Mode| match m {
        Mode::Forward => 0,
        Mode::Deaf => 1,
        Mode::Stall => 2,
        Mode::Cut => 3,
    };
    loop {
        let (p, o) = (*proxy.borrow_and_update(), *own.borrow_and_update());
        effective.send_replace(if strictness(p) >= strictness(o) { p } else { o });
        tokio::select! {
            changed = proxy.changed() => if changed.is_err() { return },
            changed = own.changed() => if changed.is_err() { return },
        }
    }
}

#[derive(Default)]
struct Counts {
    /// Connections accepted and forwarded since the start.
    forwarded: AtomicU64,
    /// Connections accepted and closed at once because the proxy was cut.
    refused: AtomicU64,
}

/// Counts a connection as live until dropped.
struct LiveGuard(Arc<watch::Sender<usize>>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

async fn proxy_connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    _live: LiveGuard,
) {
    let connecting = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut server = tokio::select! {
        connected = connecting => match connected {
            Ok(Ok(server)) => server,
            _ => return,
        },
        () = until_cut(&mut mode) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    // Either direction ending (EOF, error, cut, proxy dropped) ends both: the sockets are
    // dropped together, as a broken link would be.
    tokio::select! {
        () = pump(client_read, server_write, mode.clone(), false) => {}
        () = pump(server_read, client_write, mode.clone(), true) => {}
    }
}

/// Resolves when the mode becomes `Cut` or the proxy is dropped.
async fn until_cut(mode: &mut watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Cut).await;
}

/// Waits until bytes may flow (`Deaf` lets only the client's through): `true` then, `false`
/// once cut or dropped.
async fn may_forward(mode: &mut watch::Receiver<Mode>, to_client: bool) -> bool {
    match mode.wait_for(|m| *m != Mode::Stall && !(to_client && *m == Mode::Deaf)).await {
        Ok(m) => *m != Mode::Cut,
        Err(_) => false,
    }
}

/// Copies one direction while the mode allows it. Reads and writes are each raced against a
/// mode change (both are cancel-safe on a `TcpStream` half), so a stall stops the copy between
/// any two system calls and a cut ends it at once.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
    to_client: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if !may_forward(&mut mode, to_client).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        let mut pending = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => &buffer[..n],
        };
        while !pending.is_empty() {
            if !may_forward(&mut mode, to_client).await {
                return;
            }
            let written = tokio::select! {
                written = to.write(pending) => written,
                changed = mode.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            };
            match written {
                Ok(0) | Err(_) => return,
                Ok(n) => pending = &pending[n..],
            }
        }
    }
}

/// The proxy's own behaviour, against an echo server: no broker involved.
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::ChaosProxy;
    use crate::helpers::within;

    /// A server that echoes every byte back, on every connection, until dropped with the runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn connect(proxy: &ChaosProxy) -> TcpStream {
        within("a connection through the proxy", TcpStream::connect(("127.0.0.1", proxy.port())))
            .await
            .unwrap()
    }

    async fn echo(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        stream.write_all(bytes).await.unwrap();
        let mut back = vec![0; bytes.len()];
        within("the echo", stream.read_exact(&mut back)).await.unwrap();
        back
    }

    /// Reads until the peer closes; `true` if it did within the bound (EOF or reset).
    async fn closed_within(stream: &mut TcpStream, bound: Duration) -> bool {
        let mut buffer = [0u8; 64];
        let reading = async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(bound, reading).await.is_ok()
    }

    #[tokio::test]
    async fn a_cut_closes_every_connection_and_refuses_new_ones_until_restored() {
        let proxy = ChaosProxy::start(echo_server().await).await;
        let mut first = connect(&proxy).await;
        let mut second = connect(&proxy).await;
        assert_eq!(echo(&mut first, b"ping").await, b"ping");
        assert_eq!(echo(&mut second, b"pong").await, b"pong");
        assert_eq!(proxy.live(), 2);

        proxy.cut().await;
        assert_eq!(proxy.live(), 0);
        assert!(closed_within(&mut first, Duration::from_secs(2)).await, "the first connection is closed");
        assert!(closed_within(&mut second, Duration::from_secs(2)).await, "the second connection is closed");
        let mut refused = connect(&proxy).await;
        assert!(
            closed_within(&mut refused, Duration::from_secs(2)).await,
            "a new connection is closed at once"
        );
        within("the refusal to be counted", async {
            while proxy.refused() < 1 {
                tokio::task::yield_now().await;
            }
        })
        .await;

        proxy.restore().await;
        let mut third = connect(&proxy).await;
        assert_eq!(echo(&mut third, b"back").await, b"back");
        assert_eq!(proxy.forwarded(), 3);
    }

    #[tokio::test]
    async fn a_stall_holds_bytes_both_ways_until_restored() {
        let proxy = ChaosProxy::start(echo_server().await).await;
        let mut stream = connect(&proxy).await;
        assert_eq!(echo(&mut stream, b"before").await, b"before");

        proxy.stall().await;
        stream.write_all(b"held").await.unwrap();
        let mut back = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut back)).await;
        assert!(early.is_err(), "nothing comes back during a stall");
        assert_eq!(proxy.live(), 1, "the connection stays open");

        proxy.restore().await;
        within("the held bytes", stream.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn stalling_one_connection_holds_only_its_bytes() {
        let proxy = ChaosProxy::start(echo_server().await).await;
        let mut first = connect(&proxy).await;
        assert_eq!(echo(&mut first, b"one").await, b"one");
        let mut second = connect(&proxy).await;
        assert_eq!(echo(&mut second, b"two").await, b"two");

        proxy.stall_connection(1).await;
        second.write_all(b"held").await.unwrap();
        let mut back = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read_exact(&mut back)).await;
        assert!(early.is_err(), "nothing comes back on the stalled connection");
        assert_eq!(echo(&mut first, b"free").await, b"free", "the other connection flows");

        proxy.restore_connection(1).await;
        within("the held bytes", second.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections_and_its_port() {
        let proxy = ChaosProxy::start(echo_server().await).await;
        let port = proxy.port();
        let mut stream = connect(&proxy).await;
        assert_eq!(echo(&mut stream, b"hi").await, b"hi");
        proxy.stall().await;
        drop(proxy);
        assert!(closed_within(&mut stream, Duration::from_secs(2)).await, "the proxied connection is closed");
        within("the listener to close", async {
            while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}
