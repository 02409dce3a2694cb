//! fanout's store, measured: every repository call is timed into
//! `chappe_fanout_store_operation_duration_seconds{operation}` and runs in a
//! `store` span (so a trace shows where a submit spent its time); a message
//! actually inserted counts in `chappe_fanout_messages_stored_total`.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chappe_proto::ids::{ConversationId, MessageId};
use chappe_storage::{
    ConversationRepo, ConversationRow, InboxRepo, InboxRow, InsertMessage, MemberChange,
    MembershipRow, MessageRepo, MessageRow, Result,
};
use chappe_telemetry::metrics;

use crate::FanoutStore;

/// A [`FanoutStore`] that measures the one it wraps.
pub struct MeteredStore {
    inner: Arc<dyn FanoutStore>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn FanoutStore>) -> Self {
        Self { inner }
    }
}

/// Runs one store operation in a span, timing it.
async fn timed<T>(operation: &'static str, call: impl Future<Output = T>) -> T {
    metrics::timed_store_call(&metrics::metrics().fanout_store_duration, operation, call).await
}

#[async_trait]
impl ConversationRepo for MeteredStore {
    async fn create_conversation(
        &self,
        row: &ConversationRow,
        log: &[(MembershipRow, MemberChange)],
    ) -> Result<()> {
        timed(
            "create_conversation",
            self.inner.create_conversation(row, log),
        )
        .await
    }

    async fn get_conversation(&self, id: ConversationId) -> Result<Option<ConversationRow>> {
        timed("get_conversation", self.inner.get_conversation(id)).await
    }

    async fn members(&self, id: ConversationId) -> Result<Vec<String>> {
        timed("members", self.inner.members(id)).await
    }

    async fn is_member(&self, id: ConversationId, user_id: &str) -> Result<bool> {
        timed("is_member", self.inner.is_member(id, user_id)).await
    }

    async fn membership_log(&self, id: ConversationId) -> Result<Vec<MembershipRow>> {
        timed("membership_log", self.inner.membership_log(id)).await
    }

    async fn append_membership(&self, row: &MembershipRow, change: MemberChange) -> Result<()> {
        timed(
            "append_membership",
            self.inner.append_membership(row, change),
        )
        .await
    }

    async fn conversations_of(&self, user_id: &str) -> Result<Vec<ConversationRow>> {
        timed("conversations_of", self.inner.conversations_of(user_id)).await
    }
}

#[async_trait]
impl MessageRepo for MeteredStore {
    async fn insert_message(&self, row: &MessageRow) -> Result<InsertMessage> {
        let result = timed("insert_message", self.inner.insert_message(row)).await;
        if let Ok(InsertMessage::Inserted) = result {
            metrics::metrics().fanout_messages_stored.inc();
        }
        result
    }

    async fn get_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<MessageRow>> {
        timed("get_message", self.inner.get_message(conversation, id)).await
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        timed(
            "messages_after",
            self.inner.messages_after(conversation, after, limit),
        )
        .await
    }

    async fn messages_before(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        timed(
            "messages_before",
            self.inner.messages_before(conversation, before, limit),
        )
        .await
    }
}

#[async_trait]
impl InboxRepo for MeteredStore {
    async fn put_to_device(
        &self,
        sender_user_id: &str,
        sender_device_id: &str,
        client_msg_id: &str,
        rows: &[InboxRow],
    ) -> Result<bool> {
        timed(
            "put_to_device",
            self.inner
                .put_to_device(sender_user_id, sender_device_id, client_msg_id, rows),
        )
        .await
    }

    async fn inbox(&self, user_id: &str, device_id: &str, limit: usize) -> Result<Vec<InboxRow>> {
        timed("inbox", self.inner.inbox(user_id, device_id, limit)).await
    }

    async fn delete_inbox(&self, user_id: &str, device_id: &str, ids: &[MessageId]) -> Result<u64> {
        timed(
            "delete_inbox",
            self.inner.delete_inbox(user_id, device_id, ids),
        )
        .await
    }
}
