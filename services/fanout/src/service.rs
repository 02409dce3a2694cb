//! The request/reply handlers of `chappe.rpc.fanout.*`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use chappe_bus::rpc::Server;
use chappe_bus::subjects::{FANOUT_GROUP, FanoutMethod};
use chappe_bus::{Bus, Headers, RpcError, Subjects};
use chappe_proto::ids::{ConversationId, MessageId, MessageIdGenerator, UserId};
use chappe_proto::internal::{
    self as wire, DeliverJob, ToDeviceDelivery, UserDelivery, user_delivery,
};
use chappe_proto::v1::{self, ConversationKind, Direction, MembershipOp};
use chappe_storage::{
    ConversationRow, InboxRow, InsertMessage, MemberChange, MembershipRow, MessageRow,
};
use prost::Message as _;

use crate::config::FanoutConfig;
use crate::convert::{self, Actor, Submission, ToDevice};
use crate::error::{Error, Result};
use crate::{FanoutStore, notify};

/// How often a membership update retries when another writer took its seq.
const MEMBERSHIP_ATTEMPTS: usize = 5;

/// Locks that order the submits of one conversation (striped, so memory
/// stays fixed whatever the number of conversations).
const SUBMIT_STRIPES: usize = 256;

/// fanout's state shared by every handler.
pub struct Service {
    config: FanoutConfig,
    store: Arc<dyn FanoutStore>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    ids: MessageIdGenerator,
    /// A message id is taken and its row committed under the conversation's
    /// stripe, so ids commit in increasing order within a conversation and a
    /// sync cursor never passes a message that commits later within one
    /// process. Across fanout processes, sync's settle window covers it.
    submit_order: Vec<tokio::sync::Mutex<()>>,
}

/// Registers every fanout method on a server.
pub fn routes(
    service: Arc<Service>,
    bus: Arc<dyn Bus>,
    subjects: &Subjects,
    max_in_flight: usize,
) -> Server {
    macro_rules! route {
        ($server:expr, $method:ident, $handler:ident) => {{
            let s = service.clone();
            $server.route(subjects.fanout(FanoutMethod::$method), move |r| {
                let s = s.clone();
                async move { s.$handler(r).await.map_err(RpcError::from) }
            })
        }};
    }
    let server = Server::new(bus, FANOUT_GROUP, max_in_flight);
    let server = route!(server, CreateConversation, create_conversation);
    let server = route!(server, ListConversations, list_conversations);
    let server = route!(server, GetConversation, get_conversation);
    let server = route!(server, UpdateMembership, update_membership);
    let server = route!(server, Submit, submit);
    let server = route!(server, SubmitToDevice, submit_to_device);
    let server = route!(server, AckToDevice, ack_to_device);
    let server = route!(server, Sync, sync);
    let server = route!(server, History, history);
    let server = route!(server, Contacts, contacts);
    route!(server, Memberships, memberships)
}

impl Service {
    pub fn new(
        config: FanoutConfig,
        store: Arc<dyn FanoutStore>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Self {
        Self {
            config,
            store,
            bus,
            subjects,
            ids: MessageIdGenerator::new(),
            submit_order: (0..SUBMIT_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// The conversation, if `user` is a member of it.
    async fn member_conversation(
        &self,
        id: ConversationId,
        user: &UserId,
    ) -> Result<ConversationRow> {
        let row = self
            .store
            .get_conversation(id)
            .await?
            .ok_or_else(|| Error::UnknownConversation(id.to_string()))?;
        if !self.store.is_member(id, user.as_str()).await? {
            return Err(Error::NotMember {
                user: user.to_string(),
                conversation: id.to_string(),
            });
        }
        Ok(row)
    }

    /// Olm messages go only to the sender's own devices and to users who
    /// share a conversation with the sender: nobody can fill a stranger's
    /// inbox.
    async fn check_shares_conversations<'a>(
        &self,
        sender: &UserId,
        recipients: impl Iterator<Item = &'a UserId>,
    ) -> Result<()> {
        let strangers: BTreeSet<&UserId> = recipients.filter(|r| *r != sender).collect();
        if strangers.is_empty() {
            return Ok(());
        }
        let mut known = BTreeSet::new();
        for row in self.store.conversations_of(sender.as_str()).await? {
            known.extend(self.store.members(row.conversation_id).await?);
        }
        match strangers.into_iter().find(|r| !known.contains(r.as_str())) {
            Some(stranger) => Err(Error::Stranger(stranger.to_string())),
            None => Ok(()),
        }
    }

    async fn conversation_wire(&self, row: &ConversationRow) -> Result<v1::Conversation> {
        let members = self.store.members(row.conversation_id).await?;
        Ok(convert::conversation(row, members))
    }

    #[tracing::instrument(skip_all)]
    pub async fn create_conversation(
        &self,
        req: wire::CreateConversation,
    ) -> Result<v1::CreateConversationResponse> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        let kind = ConversationKind::try_from(req.kind)
            .ok()
            .filter(|k| *k != ConversationKind::Unspecified)
            .ok_or_else(|| Error::Invalid("kind must be DIRECT or GROUP".into()))?;
        let mut others = BTreeSet::new();
        for user in req.member_user_ids {
            let user = UserId::parse(user)?;
            if user != actor.user {
                others.insert(user);
            }
        }
        match kind {
            ConversationKind::Direct if others.len() != 1 => {
                return Err(Error::Invalid(
                    "a direct conversation has exactly one other member".into(),
                ));
            }
            _ if others.len() + 1 > self.config.max_group_members => {
                return Err(Error::TooLarge {
                    what: "member list",
                    size: others.len() + 1,
                    limit: self.config.max_group_members,
                });
            }
            _ => {}
        }

        // One direct conversation per pair of users: creating it again
        // returns the one that exists.
        if kind == ConversationKind::Direct {
            for row in self.store.conversations_of(actor.user.as_str()).await? {
                if row.kind != kind as i32 {
                    continue;
                }
                let members = self.store.members(row.conversation_id).await?;
                if members.len() == 2
                    && others
                        .iter()
                        .all(|o| members.iter().any(|m| m == o.as_str()))
                {
                    return Ok(v1::CreateConversationResponse {
                        conversation: Some(convert::conversation(&row, members)),
                    });
                }
            }
        }

        let id = ConversationId::random();
        let at_ms = chappe_proto::ids::unix_ms();
        let event = |seq: u64, op: MembershipOp, target: &UserId| MembershipRow {
            conversation_id: id,
            seq,
            actor_user_id: actor.user.to_string(),
            actor_device_id: actor.device.to_string(),
            op: op as i32,
            target_user_id: target.to_string(),
            at_ms,
            signature: Vec::new(),
        };
        let mut log = vec![(
            event(1, MembershipOp::Create, &actor.user),
            MemberChange::Add,
        )];
        for (i, user) in others.iter().enumerate() {
            log.push((
                event(i as u64 + 2, MembershipOp::Add, user),
                MemberChange::Add,
            ));
        }
        let row = ConversationRow {
            conversation_id: id,
            kind: kind as i32,
            created_at_ms: at_ms,
            head: None,
            membership_seq: log.len() as u64,
        };
        self.store.create_conversation(&row, &log).await?;
        tracing::info!(conversation = %id, members = log.len(), "conversation created");
        let conversation = self.conversation_wire(&row).await?;
        notify::conversation_changed(&*self.bus, &self.subjects, &conversation, None).await;
        Ok(v1::CreateConversationResponse {
            conversation: Some(conversation),
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn list_conversations(
        &self,
        req: wire::ListConversations,
    ) -> Result<v1::ListConversationsResponse> {
        let actor = Actor::from_wire(req.actor)?;
        let mut conversations = Vec::new();
        for row in self.store.conversations_of(actor.user.as_str()).await? {
            conversations.push(self.conversation_wire(&row).await?);
        }
        Ok(v1::ListConversationsResponse { conversations })
    }

    /// For presence: the users who share at least one conversation with
    /// `user_id`, without them, each once.
    #[tracing::instrument(skip_all)]
    pub async fn contacts(&self, req: wire::ContactsRequest) -> Result<wire::ContactsResponse> {
        let user = convert::user_id(&req.user_id)?;
        let mut users = std::collections::BTreeSet::new();
        for row in self.store.conversations_of(user.as_str()).await? {
            users.extend(self.store.members(row.conversation_id).await?);
        }
        users.remove(user.as_str());
        Ok(wire::ContactsResponse {
            user_ids: users.into_iter().collect(),
        })
    }

    /// For presence and media: of the asked conversations, those `user_id`
    /// is a member of, with their members. Unknown ones are left out; at
    /// most `max_memberships_query` may be asked at once.
    #[tracing::instrument(skip_all)]
    pub async fn memberships(
        &self,
        req: wire::MembershipsRequest,
    ) -> Result<wire::MembershipsResponse> {
        let user = convert::user_id(&req.user_id)?;
        if req.conversation_ids.len() > self.config.max_memberships_query {
            return Err(Error::Invalid(format!(
                "{} conversations asked; at most {} (max_memberships_query)",
                req.conversation_ids.len(),
                self.config.max_memberships_query
            )));
        }
        let mut asked = std::collections::BTreeSet::new();
        for id in &req.conversation_ids {
            asked.insert(convert::conversation_id(id)?);
        }
        let mut conversations = Vec::new();
        for id in asked {
            if !self.store.is_member(id, user.as_str()).await? {
                continue;
            }
            conversations.push(wire::ConversationMembers {
                conversation_id: id.to_string(),
                user_ids: self.store.members(id).await?,
            });
        }
        Ok(wire::MembershipsResponse { conversations })
    }

    #[tracing::instrument(skip_all)]
    pub async fn get_conversation(
        &self,
        req: wire::GetConversation,
    ) -> Result<v1::GetConversationResponse> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        let id = convert::conversation_id(&req.conversation_id)?;
        let row = self.member_conversation(id, &actor.user).await?;
        let log = self.store.membership_log(id).await?;
        Ok(v1::GetConversationResponse {
            conversation: Some(self.conversation_wire(&row).await?),
            membership_log: log.into_iter().map(convert::membership_event).collect(),
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn update_membership(
        &self,
        req: wire::UpdateMembership,
    ) -> Result<v1::UpdateMembershipResponse> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        let id = convert::conversation_id(&req.conversation_id)?;
        let op = MembershipOp::try_from(req.op)
            .ok()
            .filter(|op| {
                matches!(
                    op,
                    MembershipOp::Add | MembershipOp::Remove | MembershipOp::Leave
                )
            })
            .ok_or_else(|| Error::Invalid("op must be ADD, REMOVE or LEAVE".into()))?;
        let target = match op {
            MembershipOp::Leave => actor.user.clone(),
            _ => UserId::parse(req.target_user_id)?,
        };
        for _ in 0..MEMBERSHIP_ATTEMPTS {
            let row = self.member_conversation(id, &actor.user).await?;
            if row.kind != ConversationKind::Group as i32 {
                return Err(Error::Refused(
                    "the members of a direct conversation are fixed".into(),
                ));
            }
            let is_member = self.store.is_member(id, target.as_str()).await?;
            let change = match (op, is_member) {
                (MembershipOp::Add, false) => {
                    let count = self.store.members(id).await?.len();
                    if count + 1 > self.config.max_group_members {
                        return Err(Error::TooLarge {
                            what: "member list",
                            size: count + 1,
                            limit: self.config.max_group_members,
                        });
                    }
                    MemberChange::Add
                }
                (MembershipOp::Remove | MembershipOp::Leave, true) => MemberChange::Remove,
                (MembershipOp::Add, true) => {
                    return Err(Error::Refused(format!("{target} is already a member")));
                }
                _ => return Err(Error::Refused(format!("{target} is not a member"))),
            };
            let event = MembershipRow {
                conversation_id: id,
                seq: row.membership_seq + 1,
                actor_user_id: actor.user.to_string(),
                actor_device_id: actor.device.to_string(),
                op: op as i32,
                target_user_id: target.to_string(),
                at_ms: chappe_proto::ids::unix_ms(),
                signature: Vec::new(),
            };
            match self.store.append_membership(&event, change).await {
                Ok(()) => {
                    let row = self
                        .store
                        .get_conversation(id)
                        .await?
                        .ok_or_else(|| Error::UnknownConversation(id.to_string()))?;
                    let conversation = self.conversation_wire(&row).await?;
                    let left = (change == MemberChange::Remove).then_some(&target);
                    notify::conversation_changed(&*self.bus, &self.subjects, &conversation, left)
                        .await;
                    return Ok(v1::UpdateMembershipResponse {
                        event: Some(convert::membership_event(event)),
                        conversation: Some(conversation),
                    });
                }
                Err(chappe_storage::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contended)
    }

    /// Stores a conversation message, then queues its delivery. Answers only
    /// once the store has committed it.
    #[tracing::instrument(skip_all, fields(conversation))]
    pub async fn submit(&self, req: wire::Submit) -> Result<v1::SendResult> {
        let actor = Actor::from_wire(req.actor)?;
        let send =
            Submission::from_wire(convert::body(req.request)?, self.config.max_message_bytes)?;
        tracing::Span::current().record("conversation", tracing::field::display(send.conversation));
        self.member_conversation(send.conversation, &actor.user)
            .await?;
        let stripe = (send.conversation.as_u128() % SUBMIT_STRIPES as u128) as usize;
        let in_order = self.submit_order[stripe].lock().await;
        let message_id = self.ids.next();
        let row = MessageRow {
            conversation_id: send.conversation,
            message_id,
            sender_user_id: actor.user.to_string(),
            sender_device_id: actor.device.to_string(),
            client_msg_id: send.client_msg_id.to_string(),
            ciphertext: send.ciphertext,
            session_id: send.session_id,
            sent_at_ms: message_id.timestamp_ms() as i64,
        };
        let (stored, duplicate) = match self.store.insert_message(&row).await? {
            InsertMessage::Inserted => (row, false),
            InsertMessage::Duplicate(existing) => (existing, true),
        };
        drop(in_order);
        // Queued again on a retry too: the first attempt may have stored the
        // message and died before queueing it. Deliveries are idempotent.
        let job = DeliverJob {
            conversation_id: stored.conversation_id.to_string(),
            message_id: stored.message_id.to_string(),
        };
        if let Err(e) = self
            .bus
            .enqueue(
                &self.subjects.jobs_deliver(),
                Headers::new(),
                Bytes::from(job.encode_to_vec()),
            )
            .await
        {
            // Acknowledging now would leave connected recipients without it
            // until they sync again: the sender retries instead.
            tracing::warn!(error = %e, message = %stored.message_id, "delivery job not queued");
            return Err(Error::NotQueued(stored.message_id.to_string()));
        }
        Ok(v1::SendResult {
            conversation_id: stored.conversation_id.to_string(),
            message_id: stored.message_id.to_string(),
            client_msg_id: stored.client_msg_id,
            sent_at_ms: stored.sent_at_ms,
            duplicate,
        })
    }

    /// Stores Olm messages in their recipients' inboxes, then notifies the
    /// recipients' gateways.
    #[tracing::instrument(skip_all)]
    pub async fn submit_to_device(
        &self,
        req: wire::SubmitToDevice,
    ) -> Result<v1::SendToDeviceResult> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        let client_msg_id = chappe_proto::ids::ClientMsgId::parse(req.client_msg_id)?;
        if req.messages.len() > self.config.max_to_device_batch {
            return Err(Error::TooLarge {
                what: "to-device batch (messages)",
                size: req.messages.len(),
                limit: self.config.max_to_device_batch,
            });
        }
        let messages = req
            .messages
            .into_iter()
            .map(|m| ToDevice::from_wire(m, self.config.max_to_device_bytes))
            .collect::<Result<Vec<_>>>()?;
        self.check_shares_conversations(&actor.user, messages.iter().map(|m| &m.user))
            .await?;
        let sent_at_ms = chappe_proto::ids::unix_ms();
        let rows: Vec<InboxRow> = messages
            .into_iter()
            .map(|m| InboxRow {
                user_id: m.user.to_string(),
                device_id: m.device.to_string(),
                inbox_id: self.ids.next(),
                sender_user_id: actor.user.to_string(),
                sender_device_id: actor.device.to_string(),
                olm_type: m.olm_type,
                ciphertext: m.ciphertext,
                sent_at_ms,
            })
            .collect();
        let stored = self
            .store
            .put_to_device(
                actor.user.as_str(),
                actor.device.as_str(),
                client_msg_id.as_str(),
                &rows,
            )
            .await?;
        if stored {
            for row in rows {
                let Ok(user) = UserId::parse(row.user_id.clone()) else {
                    continue;
                };
                let delivery = UserDelivery {
                    item: Some(user_delivery::Item::ToDevice(ToDeviceDelivery {
                        device_id: row.device_id.clone(),
                        event: Some(convert::to_device_event(row)),
                    })),
                };
                if let Err(e) = self
                    .bus
                    .publish(
                        &self.subjects.deliver_user(&user),
                        Headers::new(),
                        Bytes::from(delivery.encode_to_vec()),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "to-device notification not published");
                }
            }
        }
        Ok(v1::SendToDeviceResult {
            client_msg_id: client_msg_id.to_string(),
            duplicate: !stored,
        })
    }

    #[tracing::instrument(skip_all)]
    pub async fn ack_to_device(&self, req: wire::AckToDevice) -> Result<v1::AckToDeviceResult> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        if req.inbox_ids.len() > self.config.sync_inbox_limit {
            return Err(Error::TooLarge {
                what: "ack (inbox ids)",
                size: req.inbox_ids.len(),
                limit: self.config.sync_inbox_limit,
            });
        }
        let ids = req
            .inbox_ids
            .iter()
            .map(|id| chappe_proto::ids::MessageId::parse(id))
            .collect::<Result<Vec<_>, _>>()?;
        let removed = self
            .store
            .delete_inbox(actor.user.as_str(), actor.device.as_str(), &ids)
            .await?;
        Ok(v1::AckToDeviceResult {
            removed: removed as u32,
        })
    }

    /// What a (re)connecting device missed: its inbox, then every
    /// conversation whose head moved past the device's cursor.
    #[tracing::instrument(skip_all)]
    pub async fn sync(&self, req: wire::Sync) -> Result<v1::SyncResponse> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        let limit = convert::limit(
            req.limit,
            self.config.sync_limit,
            self.config.max_sync_limit,
        );
        let mut cursors = HashMap::new();
        for c in req.cursors {
            cursors.insert(
                convert::conversation_id(&c.conversation_id)?,
                convert::optional_message_id(&c.message_id)?,
            );
        }

        // Everything below counts against one byte budget, so the answer
        // fits a client's frame limit; what does not fit says `limited`.
        let mut budget = Budget::new(self.config.max_sync_bytes);
        let inbox_limit = self.config.sync_inbox_limit;
        let inbox = self
            .store
            .inbox(actor.user.as_str(), actor.device.as_str(), inbox_limit + 1)
            .await?;
        let mut to_device_limited = inbox.len() > inbox_limit;
        let mut to_device = Vec::new();
        for row in inbox.into_iter().take(inbox_limit) {
            if !budget.take(row.ciphertext.len()) {
                to_device_limited = true;
                break;
            }
            to_device.push(convert::to_device_event(row));
        }

        let mut conversations: Vec<v1::ConversationUpdate> = Vec::new();
        for row in self.store.conversations_of(actor.user.as_str()).await? {
            let cursor = cursors.get(&row.conversation_id).copied();
            let known = cursor.is_some();
            let after = match cursor.flatten() {
                Some(after) if !req.continuation => Some(self.settled(after)),
                after => after,
            };
            let moved = match (row.head, after) {
                (None, _) => false,
                (Some(head), Some(after)) => head > after,
                (Some(_), None) => true,
            };
            if known && !moved {
                continue;
            }
            if budget.exhausted() {
                // The rest comes with the next sync round.
                match conversations.last_mut() {
                    Some(last) => last.limited = true,
                    None => to_device_limited = true,
                }
                break;
            }
            let stored = if moved {
                self.store
                    .messages_after(row.conversation_id, after, limit + 1)
                    .await?
            } else {
                Vec::new()
            };
            let mut limited = stored.len() > limit;
            let mut messages = Vec::new();
            for m in stored.into_iter().take(limit) {
                if !budget.take(m.ciphertext.len()) {
                    limited = true;
                    break;
                }
                messages.push(convert::message(m));
            }
            conversations.push(v1::ConversationUpdate {
                conversation: Some(self.conversation_wire(&row).await?),
                messages,
                limited,
            });
        }
        Ok(v1::SyncResponse {
            to_device,
            to_device_limited,
            conversations,
        })
    }

    /// The cursor a sync answers from: `settle window` before the device's
    /// own, so that a message whose id is below the cursor but which
    /// committed after the device's last sync still reaches it.
    fn settled(&self, cursor: MessageId) -> MessageId {
        let window = u64::try_from(self.config.sync_settle_window.as_millis()).unwrap_or(u64::MAX);
        if window == 0 {
            return cursor;
        }
        MessageId::floor(cursor.timestamp_ms().saturating_sub(window))
    }

    #[tracing::instrument(skip_all)]
    pub async fn history(&self, req: wire::History) -> Result<v1::HistoryResponse> {
        let actor = Actor::from_wire(req.actor)?;
        let req = convert::body(req.request)?;
        let id = convert::conversation_id(&req.conversation_id)?;
        let from = convert::optional_message_id(&req.from_message_id)?;
        let limit = convert::limit(
            req.limit,
            self.config.history_limit,
            self.config.max_history_limit,
        );
        self.member_conversation(id, &actor.user).await?;
        let rows = match Direction::try_from(req.direction) {
            Ok(Direction::Forward) => self.store.messages_after(id, from, limit).await?,
            Ok(Direction::Backward | Direction::Unspecified) => {
                self.store.messages_before(id, from, limit).await?
            }
            Err(_) => {
                return Err(Error::Invalid(format!(
                    "unknown direction {}",
                    req.direction
                )));
            }
        };
        let mut budget = Budget::new(self.config.max_history_bytes);
        let full_page = rows.len() == limit;
        let mut messages: Vec<v1::Message> = Vec::with_capacity(rows.len());
        let mut cut = false;
        for row in rows {
            if !budget.take(row.ciphertext.len()) {
                cut = true;
                break;
            }
            messages.push(convert::message(row));
        }
        let next_from = if full_page || cut {
            messages
                .last()
                .map(|m| m.message_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(v1::HistoryResponse {
            messages,
            next_from,
        })
    }
}

/// Bytes left for an answer. The first entry always fits, so an answer
/// always makes progress.
struct Budget {
    left: usize,
    first: bool,
}

/// What an entry costs besides its ciphertext (ids, sender, framing).
const ENTRY_OVERHEAD: usize = 160;

impl Budget {
    fn new(bytes: usize) -> Self {
        Self {
            left: bytes,
            first: true,
        }
    }

    /// Takes room for one entry of `ciphertext` bytes, if there is some.
    fn take(&mut self, ciphertext: usize) -> bool {
        let cost = ciphertext + ENTRY_OVERHEAD;
        if cost > self.left && !self.first {
            return false;
        }
        self.first = false;
        self.left = self.left.saturating_sub(cost);
        true
    }

    fn exhausted(&self) -> bool {
        !self.first && self.left == 0
    }
}
