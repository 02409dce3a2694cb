//! fanout's conversation tables: conversations, their heads, the
//! membership log, members and each user's conversations.

use async_trait::async_trait;
use chappe_proto::ids::{ConversationId, MessageId};

use super::{BATCH_ROWS, CqlStore, Inner, Lwt, fan_out, from_i64, parse_id, required, to_i64};
use crate::{ConversationRepo, ConversationRow, Error, MemberChange, MembershipRow, Result};

type ConversationTuple = (String, Option<i32>, Option<i64>, Option<i64>);
type MembershipTuple = (String, i64, String, String, i32, String, i64, Vec<u8>);
/// `membership_seq` and the last event of a conversation row (see the
/// `conversation_last` statement).
type LastTuple = (
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<i32>,
    Option<i64>,
    Option<i64>,
);

fn change_code(change: MemberChange) -> i32 {
    match change {
        MemberChange::None => 0,
        MemberChange::Add => 1,
        MemberChange::Remove => 2,
    }
}

fn change_of(code: i32) -> Result<MemberChange> {
    match code {
        0 => Ok(MemberChange::None),
        1 => Ok(MemberChange::Add),
        2 => Ok(MemberChange::Remove),
        other => Err(super::corrupt(
            "conversations",
            format!("last_change {other} is not a member change"),
        )),
    }
}

fn membership(t: MembershipTuple) -> Result<MembershipRow> {
    const T: &str = "membership_log";
    Ok(MembershipRow {
        conversation_id: parse_id(T, &t.0, ConversationId::parse)?,
        seq: from_i64(T, "seq", t.1)?,
        actor_user_id: t.2,
        actor_device_id: t.3,
        op: t.4,
        target_user_id: t.5,
        at_ms: t.6,
        signature: t.7,
    })
}

/// A conversation row as read for an append.
struct Last {
    membership_seq: u64,
    /// The event that set `membership_seq`, if an append did.
    event: Option<(MembershipRow, MemberChange)>,
    attempt: Option<i64>,
    created_by: Option<i64>,
}

fn last(id: ConversationId, t: LastTuple) -> Result<Last> {
    const T: &str = "conversations";
    let membership_seq = from_i64(T, "membership_seq", required(T, "membership_seq", t.0)?)?;
    let event = match (t.1, t.2, t.3, t.4, t.5, t.6, t.7, t.8) {
        (
            Some(seq),
            Some(actor_user_id),
            Some(actor_device_id),
            Some(op),
            Some(target_user_id),
            Some(at_ms),
            signature,
            Some(change),
        ) => Some((
            MembershipRow {
                conversation_id: id,
                seq: from_i64(T, "last_seq", seq)?,
                actor_user_id,
                actor_device_id,
                op,
                target_user_id,
                at_ms,
                signature: signature.unwrap_or_default(),
            },
            change_of(change)?,
        )),
        _ => None,
    };
    Ok(Last {
        membership_seq,
        event,
        attempt: t.9,
        created_by: t.10,
    })
}

/// The creation log must be seqs 1..=n of this conversation, ending at the
/// row's `membership_seq` (as the embedded store checks).
fn check_creation_log(row: &ConversationRow, log: &[(MembershipRow, MemberChange)]) -> Result<()> {
    let id = row.conversation_id;
    let in_order = log
        .iter()
        .zip(1u64..)
        .all(|((event, _), seq)| event.seq == seq && event.conversation_id == id);
    if !in_order || row.membership_seq != log.len() as u64 {
        return Err(Error::Conflict(format!(
            "conversation {id}: the creation log must hold seqs 1..={} of this conversation",
            row.membership_seq
        )));
    }
    Ok(())
}

/// The write timestamp of a head: the id's time in microseconds, plus the
/// id's counter within its millisecond (capped), so that a greater id
/// writes with a greater or equal timestamp (and on a tie, the greater
/// value, the greater id, wins).
pub(crate) fn head_timestamp(id: MessageId) -> i64 {
    let ms = i64::try_from(id.timestamp_ms()).unwrap_or(i64::MAX / 1000);
    let counter = ((id.as_u128() >> 64) & 0xffff) as i64;
    ms.saturating_mul(1000).saturating_add(counter.min(999))
}

impl Inner {
    /// Moves a conversation's head to `id` unless it holds a greater one.
    pub(crate) async fn put_head(&self, conversation: ConversationId, id: MessageId) -> Result<()> {
        self.write(
            "conversation_heads",
            &self.st.head_put,
            (head_timestamp(id), id.to_string(), conversation.to_string()),
        )
        .await
    }

    pub(crate) async fn conversation(&self, id: ConversationId) -> Result<Option<ConversationRow>> {
        const T: &str = "conversations";
        let key = id.to_string();
        let (row, head) = tokio::try_join!(
            self.first::<ConversationTuple>(T, &self.st.conversation_get, (key.as_str(),)),
            self.first::<(Option<String>,)>(
                "conversation_heads",
                &self.st.head_get,
                (key.as_str(),)
            ),
        )?;
        let Some((stored_id, kind, created_at_ms, membership_seq)) = row else {
            return Ok(None);
        };
        let head = head
            .and_then(|(h,)| h)
            .map(|h| parse_id("conversation_heads", &h, MessageId::parse))
            .transpose()?;
        Ok(Some(ConversationRow {
            conversation_id: parse_id(T, &stored_id, ConversationId::parse)?,
            kind: required(T, "kind", kind)?,
            created_at_ms: required(T, "created_at_ms", created_at_ms)?,
            head,
            membership_seq: from_i64(
                T,
                "membership_seq",
                required(T, "membership_seq", membership_seq)?,
            )?,
        }))
    }

    /// Adds or removes a `user_conversations` row at timestamp `ts`.
    async fn user_conversation(&self, add: bool, user: &str, id: &str, ts: i64) -> Result<()> {
        const T: &str = "user_conversations";
        if add {
            self.write(T, &self.st.user_conversation_add, (user, id, ts))
                .await
        } else {
            self.write(T, &self.st.user_conversation_remove, (ts, user, id))
                .await
        }
    }

    pub(crate) async fn conversation_exists(&self, id: ConversationId) -> Result<bool> {
        if self.conversation_known(id) {
            return Ok(true);
        }
        let row: Option<ConversationTuple> = self
            .first(
                "conversations",
                &self.st.conversation_get,
                (id.to_string(),),
            )
            .await?;
        if row.is_some() {
            self.remember_conversation(id);
        }
        Ok(row.is_some())
    }

    async fn last(&self, id: ConversationId, serial: bool) -> Result<Option<Last>> {
        let st = if serial {
            &self.st.conversation_last_serial
        } else {
            &self.st.conversation_last
        };
        let row: Option<LastTuple> = self.first("conversations", st, (id.to_string(),)).await?;
        row.map(|r| last(id, r)).transpose()
    }

    /// Writes membership events (one partition, in batches) and applies
    /// their changes to `members` and `user_conversations`, each row with
    /// its event's seq as write timestamp. Idempotent.
    async fn apply_events(&self, events: &[(MembershipRow, MemberChange)]) -> Result<()> {
        let Some((first, _)) = events.first() else {
            return Ok(());
        };
        let id = first.conversation_id.to_string();
        let id = id.as_str();
        let log: Vec<_> = events
            .iter()
            .map(|(e, _)| {
                Ok((
                    id,
                    to_i64("membership_log", "seq", e.seq)?,
                    e.actor_user_id.as_str(),
                    e.actor_device_id.as_str(),
                    e.op,
                    e.target_user_id.as_str(),
                    e.at_ms,
                    e.signature.as_slice(),
                ))
            })
            .collect::<Result<_>>()?;
        for chunk in log.chunks(BATCH_ROWS) {
            let batch = self.batch_of(&self.st.log_insert, chunk.len());
            self.batch("membership_log", &batch, chunk).await?;
        }
        let changed: Vec<_> = events
            .iter()
            .filter(|(_, change)| *change != MemberChange::None)
            .collect();
        // Adds and removes bind their values in different orders: one
        // batch kind each (timestamps make their order irrelevant).
        let adds: Vec<_> = changed
            .iter()
            .filter(|(_, c)| *c == MemberChange::Add)
            .map(|(e, _)| {
                Ok((
                    id,
                    e.target_user_id.as_str(),
                    to_i64("members", "seq", e.seq)?,
                ))
            })
            .collect::<Result<_>>()?;
        let removes: Vec<_> = changed
            .iter()
            .filter(|(_, c)| *c == MemberChange::Remove)
            .map(|(e, _)| {
                Ok((
                    to_i64("members", "seq", e.seq)?,
                    id,
                    e.target_user_id.as_str(),
                ))
            })
            .collect::<Result<_>>()?;
        for chunk in adds.chunks(BATCH_ROWS) {
            let batch = self.batch_of(&self.st.member_add, chunk.len());
            self.batch("members", &batch, chunk).await?;
        }
        for chunk in removes.chunks(BATCH_ROWS) {
            let batch = self.batch_of(&self.st.member_remove, chunk.len());
            self.batch("members", &batch, chunk).await?;
        }
        let mut writes = Vec::with_capacity(adds.len() + removes.len());
        for (id, user, ts) in adds {
            writes.push(self.user_conversation(true, user, id, ts));
        }
        for (ts, id, user) in removes {
            writes.push(self.user_conversation(false, user, id, ts));
        }
        fan_out(writes).await?;
        Ok(())
    }
}

#[async_trait]
impl ConversationRepo for CqlStore {
    /// Also a [`Error::Conflict`] when the log is not seqs 1..=n of this
    /// conversation ending at `row.membership_seq`.
    async fn create_conversation(
        &self,
        row: &ConversationRow,
        log: &[(MembershipRow, MemberChange)],
    ) -> Result<()> {
        check_creation_log(row, log)?;
        let inner = &self.inner;
        let id = row.conversation_id;
        let attempt = Inner::attempt_id();
        let outcome = inner
            .lwt(
                "conversations",
                &inner.st.conversation_insert,
                (
                    id.to_string(),
                    row.kind,
                    row.created_at_ms,
                    to_i64("conversations", "membership_seq", row.membership_seq)?,
                    attempt,
                ),
            )
            .await?;
        match outcome {
            Lwt::Applied => {}
            Lwt::NotApplied => {
                return Err(Error::Conflict(format!("conversation {id} already exists")));
            }
            Lwt::Unknown(e) => match inner.last(id, true).await? {
                Some(stored) if stored.created_by == Some(attempt) => {}
                Some(_) => {
                    return Err(Error::Conflict(format!("conversation {id} already exists")));
                }
                None => return Err(e),
            },
        }
        inner.remember_conversation(id);
        if let Some(head) = row.head {
            inner.put_head(id, head).await?;
        }
        inner.apply_events(log).await
    }

    async fn get_conversation(&self, id: ConversationId) -> Result<Option<ConversationRow>> {
        self.inner.conversation(id).await
    }

    async fn members(&self, id: ConversationId) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self
            .inner
            .all("members", &self.inner.st.members_list, (id.to_string(),))
            .await?;
        Ok(rows.into_iter().map(|(u,)| u).collect())
    }

    async fn is_member(&self, id: ConversationId, user_id: &str) -> Result<bool> {
        let row: Option<(String,)> = self
            .inner
            .first(
                "members",
                &self.inner.st.member_get,
                (id.to_string(), user_id),
            )
            .await?;
        Ok(row.is_some())
    }

    async fn membership_log(&self, id: ConversationId) -> Result<Vec<MembershipRow>> {
        let rows: Vec<MembershipTuple> = self
            .inner
            .all("membership_log", &self.inner.st.log_list, (id.to_string(),))
            .await?;
        rows.into_iter().map(membership).collect()
    }

    /// Re-applies the conversation's last event first (finishing an append
    /// whose writer stopped half-way), then takes the seq by LWT and
    /// applies the event.
    async fn append_membership(&self, row: &MembershipRow, change: MemberChange) -> Result<()> {
        let inner = &self.inner;
        let id = row.conversation_id;
        let not_next = || {
            Error::Conflict(format!(
                "membership seq {} of {id} is not the next one",
                row.seq
            ))
        };
        let Some(current) = inner.last(id, false).await? else {
            return Err(Error::Conflict(format!("conversation {id} does not exist")));
        };
        if current.membership_seq.checked_add(1) != Some(row.seq) {
            return Err(not_next());
        }
        if let Some(event) = current.event {
            inner.apply_events(std::slice::from_ref(&event)).await?;
        }
        let attempt = Inner::attempt_id();
        let seq = to_i64("conversations", "membership_seq", row.seq)?;
        let outcome = inner
            .lwt(
                "conversations",
                &inner.st.conversation_advance,
                (
                    seq,
                    seq,
                    row.actor_user_id.as_str(),
                    row.actor_device_id.as_str(),
                    row.op,
                    row.target_user_id.as_str(),
                    row.at_ms,
                    row.signature.as_slice(),
                    change_code(change),
                    attempt,
                    id.to_string(),
                    seq - 1,
                ),
            )
            .await?;
        match outcome {
            Lwt::Applied => {}
            Lwt::NotApplied => return Err(not_next()),
            Lwt::Unknown(e) => match inner.last(id, true).await? {
                Some(stored) if stored.attempt == Some(attempt) => {}
                Some(stored) if stored.membership_seq >= row.seq => return Err(not_next()),
                // Still at the previous seq: the LWT did not happen.
                Some(_) | None => return Err(e),
            },
        }
        inner.apply_events(&[(row.clone(), change)]).await
    }

    async fn conversations_of(&self, user_id: &str) -> Result<Vec<ConversationRow>> {
        let inner = &self.inner;
        let ids: Vec<(String,)> = inner
            .all(
                "user_conversations",
                &inner.st.user_conversations_list,
                (user_id,),
            )
            .await?;
        let ids = ids
            .into_iter()
            .map(|(id,)| parse_id("user_conversations", &id, ConversationId::parse))
            .collect::<Result<Vec<_>>>()?;
        let reads = ids.into_iter().map(|id| inner.conversation(id)).collect();
        let rows: Vec<Option<ConversationRow>> = fan_out(reads).await?;
        let mut rows: Vec<ConversationRow> = rows.into_iter().flatten().collect();
        rows.sort_by_key(|c| (std::cmp::Reverse(c.last_activity_ms()), c.conversation_id));
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chappe_proto::ids::MessageIdGenerator;

    #[test]
    fn head_timestamps_grow_with_ids() {
        let ids = MessageIdGenerator::new();
        let mut last = i64::MIN;
        for ms in [1_000, 1_000, 1_000, 1_001, 1_700_000_000_000] {
            let id = ids.next_at(ms);
            let ts = head_timestamp(id);
            assert!(ts >= last, "{id}: {ts} < {last}");
            last = ts;
        }
        assert_eq!(head_timestamp(MessageId::floor(5)), 5_000);
    }
}
