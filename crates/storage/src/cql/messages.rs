//! fanout's message tables: messages by `(conversation, bucket)`, the
//! buckets of each conversation, and the dedup of client ids.

use async_trait::async_trait;
use chappe_proto::ids::{ConversationId, MessageId};

use super::{CqlStore, Inner, Lwt, backoff, parse_id};
use crate::{Error, InsertMessage, MessageRepo, MessageRow, Result, bucket_of};

type MessageTuple = (String, String, String, String, String, Vec<u8>, String, i64);

fn message(t: MessageTuple) -> Result<MessageRow> {
    const T: &str = "messages";
    Ok(MessageRow {
        conversation_id: parse_id(T, &t.0, ConversationId::parse)?,
        message_id: parse_id(T, &t.1, MessageId::parse)?,
        sender_user_id: t.2,
        sender_device_id: t.3,
        client_msg_id: t.4,
        ciphertext: t.5,
        session_id: t.6,
        sent_at_ms: t.7,
    })
}

/// Below every message id (ids are 32 lowercase hex digits).
const BEFORE_ALL: &str = "";
/// Above every message id.
const AFTER_ALL: &str = "g";

/// A CQL `LIMIT` for a number of rows still wanted.
fn cql_limit(rows: usize) -> i32 {
    i32::try_from(rows).unwrap_or(i32::MAX)
}

impl Inner {
    /// Writes a message whose client id is claimed: its bucket's row (once
    /// per process), the message, then the head.
    async fn store_message(&self, row: &MessageRow) -> Result<()> {
        let id = row.conversation_id;
        let bucket = bucket_of(row.message_id);
        let key = id.to_string();
        if !self.bucket_known(id, bucket) {
            self.write(
                "message_buckets",
                &self.st.bucket_put,
                (key.as_str(), bucket),
            )
            .await?;
            self.remember_bucket(id, bucket);
        }
        self.write(
            "messages",
            &self.st.message_put,
            (
                bucket,
                key.as_str(),
                row.message_id.to_string(),
                row.sender_user_id.as_str(),
                row.sender_device_id.as_str(),
                row.client_msg_id.as_str(),
                row.ciphertext.as_slice(),
                row.session_id.as_str(),
                row.sent_at_ms,
            ),
        )
        .await?;
        self.put_head(id, row.message_id).await
    }

    async fn message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<MessageRow>> {
        let row: Option<MessageTuple> = self
            .first(
                "messages",
                &self.st.message_get,
                (conversation.to_string(), bucket_of(id), id.to_string()),
            )
            .await?;
        row.map(message).transpose()
    }

    /// The answer to a send whose client id was claimed first by `first`
    /// at `sent_at_ms`: the stored message, or, if its first attempt
    /// stopped before writing it, this send's content under that id.
    async fn duplicate(
        &self,
        row: &MessageRow,
        first: MessageId,
        sent_at_ms: i64,
    ) -> Result<InsertMessage> {
        if let Some(stored) = self.message(row.conversation_id, first).await? {
            // Its head may not have been written either.
            self.put_head(row.conversation_id, first).await?;
            return Ok(InsertMessage::Duplicate(stored));
        }
        let completed = MessageRow {
            message_id: first,
            sent_at_ms,
            ..row.clone()
        };
        tracing::info!(
            conversation = %row.conversation_id,
            message = %first,
            "completing a message whose first attempt stopped before storing it"
        );
        self.store_message(&completed).await?;
        Ok(InsertMessage::Duplicate(completed))
    }

    /// Up to `limit` messages strictly beyond `bound` in one direction,
    /// bucket after bucket.
    async fn page(
        &self,
        conversation: ConversationId,
        bound: Option<MessageId>,
        limit: usize,
        forward: bool,
    ) -> Result<Vec<MessageRow>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let key = conversation.to_string();
        let bound_bucket = bound.map(bucket_of);
        let buckets: Vec<(i64,)> = if forward {
            self.all(
                "message_buckets",
                &self.st.buckets_from,
                (key.as_str(), bound_bucket.unwrap_or(i64::MIN)),
            )
            .await?
        } else {
            self.all(
                "message_buckets",
                &self.st.buckets_down_from,
                (key.as_str(), bound_bucket.unwrap_or(i64::MAX)),
            )
            .await?
        };
        let bound_text = bound.map(|b| b.to_string());
        for (bucket,) in buckets {
            let from = match (&bound_text, bound_bucket) {
                (Some(text), Some(b)) if b == bucket => text.as_str(),
                _ if forward => BEFORE_ALL,
                _ => AFTER_ALL,
            };
            let wanted = limit - out.len();
            let st = if forward {
                &self.st.messages_after
            } else {
                &self.st.messages_before
            };
            let rows: Vec<MessageTuple> = self
                .up_to(
                    "messages",
                    st,
                    (key.as_str(), bucket, from, cql_limit(wanted)),
                    wanted,
                )
                .await?;
            for row in rows {
                out.push(message(row)?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl MessageRepo for CqlStore {
    /// A message for a conversation that does not exist is a
    /// [`Error::Conflict`].
    async fn insert_message(&self, row: &MessageRow) -> Result<InsertMessage> {
        let inner = &self.inner;
        let id = row.conversation_id;
        if !inner.conversation_exists(id).await? {
            return Err(Error::Conflict(format!("conversation {id} does not exist")));
        }
        let key = id.to_string();
        let sender = (
            key.as_str(),
            row.sender_user_id.as_str(),
            row.sender_device_id.as_str(),
            row.client_msg_id.as_str(),
        );
        let attempt = Inner::attempt_id();
        for round in 0..inner.config.lwt_attempts {
            let outcome = inner
                .lwt(
                    "message_dedup",
                    &inner.st.dedup_insert,
                    (
                        sender.0,
                        sender.1,
                        sender.2,
                        sender.3,
                        row.message_id.to_string(),
                        row.sent_at_ms,
                        attempt,
                    ),
                )
                .await?;
            if let Lwt::Applied = outcome {
                inner.store_message(row).await?;
                return Ok(InsertMessage::Inserted);
            }
            let claimed: Option<(Option<String>, Option<i64>, Option<i64>)> = inner
                .first("message_dedup", &inner.st.dedup_get_serial, sender)
                .await?;
            match claimed {
                Some((_, _, Some(by))) if by == attempt => {
                    inner.store_message(row).await?;
                    return Ok(InsertMessage::Inserted);
                }
                Some((Some(first), Some(sent_at_ms), _)) => {
                    let first = parse_id("message_dedup", &first, MessageId::parse)?;
                    return inner.duplicate(row, first, sent_at_ms).await;
                }
                Some(_) => {
                    return Err(super::corrupt(
                        "message_dedup",
                        format!(
                            "the claim of {} in {id} lacks its message id",
                            row.client_msg_id
                        ),
                    ));
                }
                // Not claimed: the LWT did not happen; again.
                None => {
                    if let Lwt::Unknown(e) = outcome {
                        tracing::debug!(error = %e, "message dedup not applied; again");
                    }
                    backoff(round).await;
                }
            }
        }
        Err(Error::Unavailable(format!(
            "message_dedup: could not claim {} in {id}",
            row.client_msg_id
        )))
    }

    async fn get_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<MessageRow>> {
        self.inner.message(conversation, id).await
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        self.inner.page(conversation, after, limit, true).await
    }

    async fn messages_before(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        self.inner.page(conversation, before, limit, false).await
    }
}
