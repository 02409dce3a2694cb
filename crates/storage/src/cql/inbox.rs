//! fanout's per-device inboxes of to-device messages, and their dedup.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chappe_proto::ids::MessageId;

use super::{BATCH_ROWS, CqlStore, Inner, Lwt, backoff, fan_out, from_i32, parse_id, to_i32};
use crate::{Error, InboxRepo, InboxRow, Result};

type InboxTuple = (String, String, String, String, String, i32, Vec<u8>, i64);

fn inbox_row(t: InboxTuple) -> Result<InboxRow> {
    const T: &str = "device_inbox";
    Ok(InboxRow {
        user_id: t.0,
        device_id: t.1,
        inbox_id: parse_id(T, &t.2, MessageId::parse)?,
        sender_user_id: t.3,
        sender_device_id: t.4,
        olm_type: from_i32(T, "olm_type", t.5)?,
        ciphertext: t.6,
        sent_at_ms: t.7,
    })
}

/// `rows` grouped by their inbox (one partition each).
fn by_inbox(rows: &[InboxRow]) -> BTreeMap<(&str, &str), Vec<&InboxRow>> {
    let mut out: BTreeMap<(&str, &str), Vec<&InboxRow>> = BTreeMap::new();
    for r in rows {
        out.entry((r.user_id.as_str(), r.device_id.as_str()))
            .or_default()
            .push(r);
    }
    out
}

impl Inner {
    /// Writes inbox rows, one batch per device inbox, inboxes concurrently.
    async fn put_inbox_rows(&self, rows: &[InboxRow]) -> Result<()> {
        let writes = by_inbox(rows)
            .into_values()
            .map(|group| self.put_inbox_group(group))
            .collect();
        fan_out(writes).await?;
        Ok(())
    }

    /// Writes the rows of one inbox, in batches.
    async fn put_inbox_group(&self, group: Vec<&InboxRow>) -> Result<()> {
        for chunk in group.chunks(BATCH_ROWS) {
            let values = chunk
                .iter()
                .map(|r| {
                    Ok((
                        r.user_id.as_str(),
                        r.device_id.as_str(),
                        r.inbox_id.to_string(),
                        r.sender_user_id.as_str(),
                        r.sender_device_id.as_str(),
                        to_i32("device_inbox", "olm_type", r.olm_type)?,
                        r.ciphertext.as_slice(),
                        r.sent_at_ms,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let batch = self.batch_of(&self.st.inbox_put, values.len());
            self.batch("device_inbox", &batch, values).await?;
        }
        Ok(())
    }

    /// Deletes inbox rows (a refused duplicate's), best effort.
    async fn delete_inbox_rows(&self, rows: &[InboxRow]) {
        for r in rows {
            let deleted = self
                .write(
                    "device_inbox",
                    &self.st.inbox_delete,
                    (
                        r.user_id.as_str(),
                        r.device_id.as_str(),
                        r.inbox_id.to_string(),
                    ),
                )
                .await;
            if let Err(e) = deleted {
                tracing::warn!(
                    error = %e, inbox_id = %r.inbox_id,
                    "a duplicate to-device row was not deleted; its device may see it twice"
                );
            }
        }
    }
}

#[async_trait]
impl InboxRepo for CqlStore {
    /// Writes the rows, then records the batch by LWT; a batch found
    /// recorded already deletes the rows it wrote and answers false.
    async fn put_to_device(
        &self,
        sender_user_id: &str,
        sender_device_id: &str,
        client_msg_id: &str,
        rows: &[InboxRow],
    ) -> Result<bool> {
        let inner = &self.inner;
        let key = (sender_user_id, sender_device_id, client_msg_id);
        inner.put_inbox_rows(rows).await?;
        let attempt = Inner::attempt_id();
        for round in 0..inner.config.lwt_attempts {
            let outcome = inner
                .lwt(
                    "to_device_dedup",
                    &inner.st.to_device_dedup_insert,
                    (key.0, key.1, key.2, attempt),
                )
                .await?;
            let recorded_by = match outcome {
                Lwt::Applied => return Ok(true),
                Lwt::NotApplied | Lwt::Unknown(_) => {
                    let row: Option<(Option<i64>,)> = inner
                        .first("to_device_dedup", &inner.st.to_device_dedup_get_serial, key)
                        .await?;
                    row.map(|(by,)| by)
                }
            };
            match recorded_by {
                Some(by) if by == Some(attempt) => return Ok(true),
                Some(_) => {
                    inner.delete_inbox_rows(rows).await;
                    return Ok(false);
                }
                None => backoff(round).await,
            }
        }
        Err(Error::Unavailable(format!(
            "to_device_dedup: could not record {sender_user_id}/{sender_device_id}/{client_msg_id}"
        )))
    }

    async fn inbox(&self, user_id: &str, device_id: &str, limit: usize) -> Result<Vec<InboxRow>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cql_limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let rows: Vec<InboxTuple> = self
            .inner
            .up_to(
                "device_inbox",
                &self.inner.st.inbox_list,
                (user_id, device_id, cql_limit),
                limit,
            )
            .await?;
        rows.into_iter().map(inbox_row).collect()
    }

    /// Reads which of `ids` are there, then deletes those in one batch.
    async fn delete_inbox(&self, user_id: &str, device_id: &str, ids: &[MessageId]) -> Result<u64> {
        let inner = &self.inner;
        let mut removed = 0;
        for chunk in ids.chunks(BATCH_ROWS) {
            let wanted: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let present: Vec<(String,)> = inner
                .all(
                    "device_inbox",
                    &inner.st.inbox_existing,
                    (user_id, device_id, &wanted),
                )
                .await?;
            if present.is_empty() {
                continue;
            }
            let values: Vec<_> = present
                .iter()
                .map(|(id,)| (user_id, device_id, id.as_str()))
                .collect();
            let batch = inner.batch_of(&inner.st.inbox_delete, values.len());
            inner.batch("device_inbox", &batch, values).await?;
            removed += present.len() as u64;
        }
        Ok(removed)
    }
}
