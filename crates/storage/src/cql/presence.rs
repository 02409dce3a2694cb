//! presence's durable per-user settings.

use super::{CqlStore, Inner, fan_out};
use crate::{PresenceSettingsRepo, Result};
use async_trait::async_trait;

#[async_trait]
impl PresenceSettingsRepo for CqlStore {
    async fn set_hide_last_seen(&self, user_id: &str, hide: bool) -> Result<()> {
        let now = chappe_proto::ids::unix_ms();
        self.inner
            .write(
                "presence_settings",
                &self.inner.st.presence_put,
                (user_id, hide, now),
            )
            .await
    }

    /// One read per user, concurrently, answered in the order asked.
    async fn hide_last_seen_many(&self, user_ids: &[&str]) -> Result<Vec<bool>> {
        let reads = user_ids
            .iter()
            .map(|user| self.inner.hide_last_seen(user))
            .collect();
        fan_out(reads).await
    }
}

impl Inner {
    async fn hide_last_seen(&self, user: &str) -> Result<bool> {
        let row: Option<(Option<bool>,)> = self
            .first("presence_settings", &self.st.presence_get, (user,))
            .await?;
        Ok(row.and_then(|(hide,)| hide).unwrap_or(false))
    }
}
