//! Fault injection: a TCP proxy on loopback, put between a client and the
//! real gateway, that plays a bad network on command. It is a test tool, not
//! a stand-in for any server: every byte it lets through is handled by the
//! real platform, and it never looks inside the bytes.
//!
//! - [`FaultProxy::sever`] cuts every open connection (both directions);
//! - [`FaultProxy::refuse_for`] closes new connections as soon as they are
//!   accepted, for a while (the network is down);
//! - [`FaultProxy::lose_replies`] makes the connections open now deaf: what
//!   the client sends still reaches the server, what the server sends back
//!   is discarded. With [`FaultProxy::sever`] after it, that is an answer
//!   lost in flight with its connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running proxy; dropping it closes its port and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// Bumped by `sever`: every connection open at that moment ends.
    severed: watch::Sender<u64>,
    /// New connections are closed at once until then.
    refuse_until: Mutex<Option<Instant>>,
    /// Connection ids, in accept order.
    next_id: AtomicU64,
    /// Connections with a smaller id lose what the server sends.
    deaf_below: AtomicU64,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy binds a loopback port");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            severed: watch::Sender::new(0),
            refuse_until: Mutex::new(None),
            next_id: AtomicU64::new(0),
            deaf_below: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// Where clients connect instead of the gateway: `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every open connection, in both directions.
    pub fn sever(&self) {
        self.shared.severed.send_modify(|n| *n += 1);
    }

    /// Closes every connection accepted during the next `period`.
    pub fn refuse_for(&self, period: Duration) {
        *self
            .shared
            .refuse_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + period);
    }

    /// From now on, the connections open now forward what the client sends
    /// but discard what the server sends. Later connections are unaffected.
    pub fn lose_replies(&self) {
        let open = self.shared.next_id.load(Ordering::SeqCst);
        self.shared.deaf_below.store(open, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

impl Shared {
    fn refusing(&self) -> bool {
        self.refuse_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.refusing() {
            drop(client);
            continue;
        }
        let severed = shared.severed.subscribe();
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(relay(client, id, severed, shared.clone()));
    }
}

/// Forwards one connection until either side closes it or it is severed;
/// then drops both sockets.
async fn relay(client: TcpStream, id: u64, mut severed: watch::Receiver<u64>, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = tokio::io::copy(&mut from_client, &mut to_server);
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from_server.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if id >= shared.deaf_below.load(Ordering::SeqCst) {
                to_client.write_all(&buf[..n]).await?;
            }
        }
    };
    tokio::select! {
        _ = severed.changed() => {}
        _ = up => {}
        _ = down => {}
    }
}
