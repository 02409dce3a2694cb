//! media's store, measured: every repository call runs in a `store` span
//! (named after the operation) and its duration is recorded per operation
//! in [`store_durations`].
//!
//! They are exported as
//! `chappe_media_store_operation_duration_seconds{operation}`.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chappe_proto::ids::ConversationId;
use chappe_storage::{
    CreateMedia, MediaChunkRow, MediaObjectRow, MediaRepo, MediaUsage, PutChunk, Result,
    StoredMedia,
};
use chappe_telemetry::metrics::{self, LatencyFamily, OperationLabels};

/// The durations of media's store calls in this process, by operation:
/// `chappe_media_store_operation_duration_seconds{operation}`.
pub fn store_durations() -> &'static LatencyFamily<OperationLabels> {
    &metrics::metrics().media_store_duration
}

/// A [`MediaRepo`] that measures the one it wraps.
pub struct MeteredStore {
    inner: Arc<dyn MediaRepo>,
    durations: LatencyFamily<OperationLabels>,
}

impl MeteredStore {
    /// Measures `inner` into [`store_durations`].
    pub fn new(inner: Arc<dyn MediaRepo>) -> Self {
        Self::with_family(inner, store_durations().clone())
    }

    /// Measures `inner` into `durations`.
    pub fn with_family(
        inner: Arc<dyn MediaRepo>,
        durations: LatencyFamily<OperationLabels>,
    ) -> Self {
        Self { inner, durations }
    }

    async fn timed<T>(&self, operation: &'static str, call: impl Future<Output = T>) -> T {
        metrics::timed_store_call(&self.durations, operation, call).await
    }
}

#[async_trait]
impl MediaRepo for MeteredStore {
    async fn create_object(
        &self,
        row: &MediaObjectRow,
        conversation: ConversationId,
    ) -> Result<CreateMedia> {
        self.timed("create_object", self.inner.create_object(row, conversation))
            .await
    }

    async fn get_object(&self, media_id: &str) -> Result<Option<StoredMedia>> {
        self.timed("get_object", self.inner.get_object(media_id))
            .await
    }

    async fn put_chunk(&self, chunk: MediaChunkRow) -> Result<PutChunk> {
        self.timed("put_chunk", self.inner.put_chunk(chunk)).await
    }

    async fn get_chunk(&self, media_id: &str, idx: u32) -> Result<Option<MediaChunkRow>> {
        self.timed("get_chunk", self.inner.get_chunk(media_id, idx))
            .await
    }

    async fn mark_complete(&self, media_id: &str) -> Result<bool> {
        self.timed("mark_complete", self.inner.mark_complete(media_id))
            .await
    }

    async fn add_post(&self, media_id: &str, conversation: ConversationId) -> Result<bool> {
        self.timed("add_post", self.inner.add_post(media_id, conversation))
            .await
    }

    async fn posts(&self, media_id: &str) -> Result<Vec<ConversationId>> {
        self.timed("posts", self.inner.posts(media_id)).await
    }

    async fn usage_since(&self, owner_user_id: &str, since_ms: i64) -> Result<Vec<MediaUsage>> {
        self.timed(
            "usage_since",
            self.inner.usage_since(owner_user_id, since_ms),
        )
        .await
    }

    async fn delete_expired(&self, now_ms: i64, limit: usize) -> Result<u64> {
        self.timed("delete_expired", self.inner.delete_expired(now_ms, limit))
            .await
    }

    async fn delete_object(&self, media_id: &str) -> Result<bool> {
        self.timed("delete_object", self.inner.delete_object(media_id))
            .await
    }
}
