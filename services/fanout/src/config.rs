//! fanout's limits and settings.

use std::time::Duration;

/// Every limit fanout enforces. Going over one gets the caller a precise
/// gRPC status naming the limit.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Requests each method handles at once (default 256).
    pub max_in_flight: usize,
    /// Largest Megolm ciphertext of one message, in bytes (default 64 KiB).
    pub max_message_bytes: usize,
    /// Largest Olm ciphertext of one to-device message (default 16 KiB).
    pub max_to_device_bytes: usize,
    /// Most recipients of one to-device batch (default 2,000).
    pub max_to_device_batch: usize,
    /// Most members of a group (default 1,000).
    pub max_group_members: usize,
    /// Messages per conversation in one sync answer when the client does
    /// not say (default 100) and at most (default 500).
    pub sync_limit: u32,
    pub max_sync_limit: u32,
    /// Inbox entries in one sync answer (default 500).
    pub sync_inbox_limit: usize,
    /// History page when the client does not say (default 50) and at most
    /// (default 500).
    pub history_limit: u32,
    pub max_history_limit: u32,
    /// Bytes of ciphertext in one sync answer and one history page (default
    /// 1 MiB each); past it the answer says `limited` and the client asks
    /// again, so an answer always fits a client's frame limit.
    pub max_sync_bytes: usize,
    pub max_history_bytes: usize,
    /// How far before a device's cursor a sync looks again (default 5 s of
    /// message-id time). Message ids are taken before their row commits, and
    /// with several fanout processes a message can commit after a device
    /// synced past its id; the window covers the commit time and the clock
    /// skew between fanout hosts. The client drops what it already has.
    pub sync_settle_window: Duration,
    /// Delivery workers (JetStream consumers) per fanout process (default 4).
    pub delivery_workers: usize,
    /// Jobs each delivery worker handles at once (default 16).
    pub delivery_jobs_in_flight: usize,
    /// Wait before a failed delivery job is tried again (default 1 s).
    pub delivery_retry_delay: Duration,
    /// Conversations one `memberships` request (from presence or media) may
    /// ask about (default 100).
    pub max_memberships_query: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            max_message_bytes: 64 * 1024,
            max_to_device_bytes: 16 * 1024,
            max_to_device_batch: 2_000,
            max_group_members: 1_000,
            sync_limit: 100,
            max_sync_limit: 500,
            sync_inbox_limit: 500,
            history_limit: 50,
            max_history_limit: 500,
            max_memberships_query: 100,
            max_sync_bytes: 1 << 20,
            max_history_bytes: 1 << 20,
            sync_settle_window: Duration::from_secs(5),
            delivery_workers: 4,
            delivery_jobs_in_flight: 16,
            delivery_retry_delay: Duration::from_secs(1),
        }
    }
}
