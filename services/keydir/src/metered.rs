//! keydir's store, measured: every repository call is timed into
//! `chappe_keydir_store_operation_duration_seconds{operation}` and runs in a
//! `store` span.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chappe_storage::{
    ClaimedKey, DeviceKeysRow, KeyRepo, OneTimeKeyRow, PutDevice, PutFallback, Result,
};
use chappe_telemetry::metrics;

/// A [`KeyRepo`] that measures the one it wraps.
pub struct MeteredStore {
    inner: Arc<dyn KeyRepo>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn KeyRepo>) -> Self {
        Self { inner }
    }
}

/// Runs one store operation in a span, timing it.
async fn timed<T>(operation: &'static str, call: impl Future<Output = T>) -> T {
    metrics::timed_store_call(&metrics::metrics().keydir_store_duration, operation, call).await
}

#[async_trait]
impl KeyRepo for MeteredStore {
    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceKeysRow>> {
        timed("get_device", self.inner.get_device(user_id, device_id)).await
    }

    async fn put_device(&self, row: &DeviceKeysRow) -> Result<PutDevice> {
        timed("put_device", self.inner.put_device(row)).await
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceKeysRow>> {
        timed("list_devices", self.inner.list_devices(user_id)).await
    }

    async fn add_one_time_keys(
        &self,
        user_id: &str,
        device_id: &str,
        keys: &[OneTimeKeyRow],
    ) -> Result<u64> {
        timed(
            "add_one_time_keys",
            self.inner.add_one_time_keys(user_id, device_id, keys),
        )
        .await
    }

    async fn count_one_time_keys(&self, user_id: &str, device_id: &str) -> Result<u64> {
        timed(
            "count_one_time_keys",
            self.inner.count_one_time_keys(user_id, device_id),
        )
        .await
    }

    async fn put_fallback_key(
        &self,
        user_id: &str,
        device_id: &str,
        key: &OneTimeKeyRow,
    ) -> Result<PutFallback> {
        timed(
            "put_fallback_key",
            self.inner.put_fallback_key(user_id, device_id, key),
        )
        .await
    }

    async fn claim_key(&self, user_id: &str, device_id: &str) -> Result<Option<ClaimedKey>> {
        timed("claim_key", self.inner.claim_key(user_id, device_id)).await
    }
}
