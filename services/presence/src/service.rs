//! The request/reply handlers of `chappe.rpc.presence.*`, and the presence
//! changes they push to the users allowed to see them.
//!
//! *Privacy*: a user sees the presence of the users who share a
//! conversation with them (and their own), and of nobody else, by query and
//! by event alike. A query for anyone else gets nothing for that user: not
//! an error, not an offline entry, so a query cannot tell whether a user
//! id exists. A change of a user's state is pushed (as
//! `UserDelivery.presence_changed` on `chappe.deliver.u.<user>`) to each
//! user who shares a conversation with them, once, and not to the user.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chappe_bus::rpc::Server;
use chappe_bus::subjects::{PRESENCE_GROUP, PresenceMethod};
use chappe_bus::{Bus, Headers, RpcError, Subjects};
use chappe_proto::ids::{DeviceId, UserId};
use chappe_proto::internal::{
    self as wire, PresenceAck, UserDelivery, presence_connection::Kind, user_delivery,
};
use chappe_proto::v1;
use chappe_storage::ConversationRepo;
use prost::Message as _;

use crate::config::PresenceConfig;
use crate::error::{Error, Result};
use crate::state::{Presence, PresenceState, UserPresence};
use crate::store::PresenceStore;

/// The authenticated device a request is made for.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user: UserId,
    pub device: DeviceId,
}

impl Actor {
    pub fn from_wire(actor: Option<v1::DeviceRef>) -> Result<Self> {
        let actor = actor.ok_or(Error::Missing("actor"))?;
        Ok(Self {
            user: UserId::parse(actor.user_id).map_err(|e| Error::invalid("actor.user_id", e))?,
            device: DeviceId::parse(actor.device_id)
                .map_err(|e| Error::invalid("actor.device_id", e))?,
        })
    }
}

/// The wire form of a presence state.
pub fn wire_state(state: PresenceState) -> v1::PresenceState {
    match state {
        PresenceState::Online => v1::PresenceState::Online,
        PresenceState::Away => v1::PresenceState::Away,
        PresenceState::Offline => v1::PresenceState::Offline,
    }
}

/// The wire form of `user`'s presence; last-seen 0 when hidden or unknown.
pub fn presence_info(user: &UserId, presence: Presence) -> v1::PresenceInfo {
    v1::PresenceInfo {
        user_id: user.to_string(),
        state: wire_state(presence.state) as i32,
        last_seen_ms: presence.last_seen_ms.unwrap_or(0),
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    u64::try_from(chappe_proto::ids::unix_ms()).unwrap_or(0)
}

/// presence's state shared by every handler.
pub struct Service {
    config: PresenceConfig,
    store: Arc<dyn PresenceStore>,
    conversations: Arc<dyn ConversationRepo>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
}

/// Registers every presence method on a server.
pub fn routes(service: Arc<Service>) -> Server {
    let server = Server::new(
        service.bus.clone(),
        PRESENCE_GROUP,
        service.config.max_in_flight,
    );
    let s = service.clone();
    let server = server.route(
        service.subjects.presence(PresenceMethod::Connection),
        move |r| {
            let s = s.clone();
            async move { s.connection(r).await.map_err(RpcError::from) }
        },
    );
    let s = service.clone();
    server.route(service.subjects.presence(PresenceMethod::Query), move |r| {
        let s = s.clone();
        async move { s.query(r).await.map_err(RpcError::from) }
    })
}

impl Service {
    pub fn new(
        config: PresenceConfig,
        store: Arc<dyn PresenceStore>,
        conversations: Arc<dyn ConversationRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Self {
        Self {
            config,
            store,
            conversations,
            bus,
            subjects,
        }
    }

    /// The users who share at least one conversation with `user`, without
    /// `user`, each once.
    pub async fn contacts(&self, user: &UserId) -> Result<BTreeSet<String>> {
        let mut users = BTreeSet::new();
        for row in self.conversations.conversations_of(user.as_str()).await? {
            users.extend(self.conversations.members(row.conversation_id).await?);
        }
        users.remove(user.as_str());
        Ok(users)
    }

    /// A device's connection, heartbeat or disconnection. When it changes
    /// the state the user is shown in, the user's contacts are told.
    #[tracing::instrument(skip_all)]
    pub async fn connection(&self, req: wire::PresenceConnection) -> Result<PresenceAck> {
        let actor = Actor::from_wire(req.actor)?;
        let kind = Kind::try_from(req.kind)
            .ok()
            .filter(|k| *k != Kind::Unspecified)
            .ok_or_else(|| {
                Error::invalid("kind", "must be CONNECTED, HEARTBEAT or DISCONNECTED")
            })?;
        let now = now_ms();
        let device = actor.device.clone();
        let active = req.active;
        // The record as it was before the attempt that was stored (the
        // change may run once per compare-and-set attempt).
        let before = Mutex::new(UserPresence::default());
        let change = |record: &mut UserPresence| {
            *before.lock().unwrap_or_else(|e| e.into_inner()) = record.clone();
            match kind {
                Kind::Connected => record.connect(&device, now),
                Kind::Heartbeat => record.heartbeat(&device, active, now),
                Kind::Disconnected => record.disconnect(&device, now),
                Kind::Unspecified => {}
            }
        };
        let after = self.store.update(&actor.user, &change).await?;
        let before = before
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .status(now, &self.config);
        let after = after.status(now, &self.config);
        if before.state != after.state {
            tracing::debug!(user = %actor.user, from = ?before.state, to = ?after.state,
                "presence changed");
            self.tell_contacts(&actor.user, after).await?;
        }
        Ok(PresenceAck {})
    }

    /// Publishes `user`'s new presence to everyone who shares a
    /// conversation with them. At most once, as every delivery.
    async fn tell_contacts(&self, user: &UserId, presence: Presence) -> Result<()> {
        let contacts = self.contacts(user).await?;
        let item = user_delivery::Item::PresenceChanged(presence_info(user, presence));
        let payload = Bytes::from(UserDelivery { item: Some(item) }.encode_to_vec());
        for contact in contacts {
            let Ok(contact) = UserId::parse(contact) else {
                continue;
            };
            if let Err(e) = self
                .bus
                .publish(
                    &self.subjects.deliver_user(&contact),
                    Headers::new(),
                    payload.clone(),
                )
                .await
            {
                tracing::warn!(error = %e, %contact, "presence change not published");
            }
        }
        Ok(())
    }

    /// The presence of the asked users whom the actor may see, in the order
    /// asked, each once; the others are left out (see the module
    /// documentation).
    #[tracing::instrument(skip_all)]
    pub async fn query(&self, req: wire::PresenceQueryRequest) -> Result<v1::PresenceResult> {
        let actor = Actor::from_wire(req.actor)?;
        let query = req.request.ok_or(Error::Missing("request"))?;
        if query.user_ids.len() > self.config.max_query_users {
            return Err(Error::TooMany {
                field: "user_ids",
                count: query.user_ids.len(),
                max: self.config.max_query_users,
            });
        }
        let mut asked = Vec::with_capacity(query.user_ids.len());
        for (i, user) in query.user_ids.into_iter().enumerate() {
            let user =
                UserId::parse(user).map_err(|e| Error::invalid(format!("user_ids[{i}]"), e))?;
            asked.push(user);
        }
        if asked.is_empty() {
            return Ok(v1::PresenceResult::default());
        }
        let contacts = self.contacts(&actor.user).await?;
        let mut seen = BTreeSet::new();
        let visible: Vec<UserId> = asked
            .into_iter()
            .filter(|u| *u == actor.user || contacts.contains(u.as_str()))
            .filter(|u| seen.insert(u.clone()))
            .collect();
        let records = self.store.get_many(&visible).await?;
        let now = now_ms();
        let presences = visible
            .iter()
            .zip(records)
            .map(|(user, record)| {
                let presence = record.map_or(Presence::UNKNOWN, |r| r.status(now, &self.config));
                presence_info(user, presence)
            })
            .collect();
        Ok(v1::PresenceResult { presences })
    }
}
