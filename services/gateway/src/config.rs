//! The gateway's settings and limits.

use std::net::SocketAddr;
use std::time::Duration;

/// Every limit the gateway enforces, with its default.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen (default 127.0.0.1:7443).
    pub listen: SocketAddr,
    /// Largest protobuf frame a client may send, in bytes (default 256 KiB).
    /// A bigger frame on `Connect` ends the stream with RESOURCE_EXHAUSTED.
    pub max_frame_bytes: usize,
    /// How long a bus request to a service may take (default 10 s).
    pub rpc_timeout: Duration,
    /// Frames buffered towards one device; a device that falls further
    /// behind is disconnected and resyncs when it reconnects (default 1,024).
    pub outbound_queue: usize,
    /// Frames of one `Connect` stream handled at once (default 64).
    pub max_pending_frames: usize,
    /// Sends (messages and to-device batches) per device per second, and the
    /// burst allowed above it (defaults 50 and 200).
    pub send_rate_per_second: u32,
    pub send_burst: u32,
    /// Unary calls per device per second, and burst (defaults 20 and 100).
    pub call_rate_per_second: u32,
    pub call_burst: u32,
    /// How long a session token lives (default 24 h).
    pub session_ttl: Duration,
    /// HTTP/2 keepalive ping interval and timeout (defaults 30 s, 10 s).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long shutdown waits for streams to finish (default 10 s).
    pub drain_grace: Duration,
    /// How often each connected device's presence is confirmed to the
    /// presence service (default 20 s; must stay well below presence's ttl,
    /// 60 s by default, so that one lost heartbeat does not make a user
    /// offline).
    pub presence_heartbeat: Duration,
    /// Largest media chunk frame a client may send on `Media.Upload`, in
    /// bytes (default 512 KiB: the media service's largest chunk, 256 KiB,
    /// and room to spare). A bigger frame ends the upload with
    /// RESOURCE_EXHAUSTED.
    pub max_media_frame_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            max_frame_bytes: 256 * 1024,
            rpc_timeout: Duration::from_secs(10),
            outbound_queue: 1_024,
            max_pending_frames: 64,
            send_rate_per_second: 50,
            send_burst: 200,
            call_rate_per_second: 20,
            call_burst: 100,
            session_ttl: Duration::from_secs(24 * 60 * 60),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(10),
            presence_heartbeat: Duration::from_secs(20),
            max_media_frame_bytes: 512 * 1024,
        }
    }
}
