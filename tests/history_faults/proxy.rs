//! A TCP proxy between the app and the broker whose connections can be stalled one by one (by
//! the order they were accepted in), or all cut at once. Bounded: every task ends with the proxy.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Stall,
    Cut,
}

pub struct Proxy {
    port: u16,
    global: watch::Sender<Mode>,
    connections: Arc<Mutex<Vec<watch::Sender<Mode>>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (global, _) = watch::channel(Mode::Forward);
        let connections = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(accept(listener, upstream, global.subscribe(), connections.clone()));
        Self { port, global, connections }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn set(&self, index: usize, mode: Mode) {
        let connections = self.connections.lock().unwrap();
        connections[index].send_replace(mode);
    }

    /// Stops forwarding on the `index`th accepted connection (0-based), both ways.
    pub fn stall(&self, index: usize) {
        self.set(index, Mode::Stall);
    }

    pub fn restore(&self, index: usize) {
        self.set(index, Mode::Forward);
    }

    /// Closes every connection and refuses new ones until [`Self::restore_all`].
    pub async fn cut_all(&self) {
        self.global.send_replace(Mode::Cut);
        for c in self.connections.lock().unwrap().iter() {
            c.send_replace(Mode::Cut);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    pub fn restore_all(&self) {
        self.global.send_replace(Mode::Forward);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.global.send_replace(Mode::Cut);
        for c in self.connections.lock().unwrap().iter() {
            c.send_replace(Mode::Cut);
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    global: watch::Receiver<Mode>,
    connections: Arc<Mutex<Vec<watch::Sender<Mode>>>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { return };
        if global.has_changed().is_err() {
            return; // the proxy was dropped
        }
        if *global.borrow() == Mode::Cut {
            drop(client);
            continue;
        }
        let (mode, watcher) = watch::channel(Mode::Forward);
        connections.lock().unwrap().push(mode);
        tokio::spawn(forward(client, upstream, watcher));
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.split();
    let (sr, sw) = server.split();
    tokio::select! {
        () = pump(cr, sw, mode.clone()) => {}
        () = pump(sr, cw, mode.clone()) => {}
    }
}

async fn may_forward(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Stall).await {
        Ok(m) => *m == Mode::Forward,
        Err(_) => false,
    }
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if !may_forward(&mut mode).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.changed() => match changed { Ok(()) => continue, Err(_) => return },
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes already read are held while stalled, and written when forwarding resumes.
        if !may_forward(&mut mode).await {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
