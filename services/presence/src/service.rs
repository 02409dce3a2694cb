//! The request/reply handlers of `chappe.rpc.presence.*`, the presence
//! changes and typing events they push to the users allowed to see them,
//! and the sweeper that announces users whose gateway went silent.
//!
//! *Privacy*: a user sees the presence of the users who share a
//! conversation with them (and their own), and of nobody else, by query and
//! by event alike. A query for anyone else gets nothing for that user: not
//! an error, not an offline entry, so a query cannot tell whether a user
//! id exists. A change of a user's state is pushed (as
//! `UserDelivery.presence_changed` on `chappe.deliver.u.<user>`) to each
//! user who shares a conversation with them, once, and not to the user.
//! Who shares a conversation with whom is fanout's to say: presence asks it
//! over the bus (`chappe.rpc.fanout.contacts` and `.memberships`) and reads
//! no table of fanout's (DESIGN.md invariant 5).
//!
//! *Typing* is relayed to the other members of the conversation (the typist
//! must be one) as `UserDelivery.typing`, and never stored.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chappe_bus::rpc::{self, Server};
use chappe_bus::subjects::{FanoutMethod, PRESENCE_GROUP, PresenceMethod};
use chappe_bus::{Bus, Headers, RpcError, Subjects};
use chappe_proto::ids::{ConversationId, DeviceId, UserId};
use chappe_proto::internal::{
    self as wire, PresenceAck, UserDelivery, presence_connection::Kind, user_delivery,
};
use chappe_proto::v1;
use chappe_storage::PresenceSettingsRepo;
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
    settings: Arc<dyn PresenceSettingsRepo>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
}

/// Registers every presence method on a server.
pub fn routes(service: Arc<Service>) -> Server {
    macro_rules! route {
        ($server:expr, $method:ident, $handler:ident) => {{
            let s = service.clone();
            $server.route(
                service.subjects.presence(PresenceMethod::$method),
                move |r| {
                    let s = s.clone();
                    async move { s.$handler(r).await.map_err(RpcError::from) }
                },
            )
        }};
    }
    let server = Server::new(
        service.bus.clone(),
        PRESENCE_GROUP,
        service.config.max_in_flight,
    );
    let server = route!(server, Connection, connection);
    let server = route!(server, Query, query);
    let server = route!(server, Typing, typing);
    route!(server, Settings, settings)
}

/// What one stored update changed in what contacts were told.
struct Announcement {
    /// The state to push, if it differs from the one last pushed.
    push: Option<Presence>,
}

impl Service {
    pub fn new(
        config: PresenceConfig,
        store: Arc<dyn PresenceStore>,
        settings: Arc<dyn PresenceSettingsRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Self {
        Self {
            config,
            store,
            settings,
            bus,
            subjects,
        }
    }

    pub fn config(&self) -> &PresenceConfig {
        &self.config
    }

    async fn ask_fanout<Req, Resp>(&self, method: FanoutMethod, request: &Req) -> Result<Resp>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        rpc::call(
            &*self.bus,
            &self.subjects.fanout(method),
            request,
            self.config.fanout_timeout,
        )
        .await
        .map_err(Error::Fanout)
    }

    /// The users who share at least one conversation with `user`, without
    /// `user`, each once (fanout says).
    pub async fn contacts(&self, user: &UserId) -> Result<BTreeSet<String>> {
        let request = wire::ContactsRequest {
            user_id: user.to_string(),
        };
        let response: wire::ContactsResponse =
            self.ask_fanout(FanoutMethod::Contacts, &request).await?;
        Ok(response.user_ids.into_iter().collect())
    }

    /// Applies `event` to the user's record and, in the same atomic update,
    /// notes the state contacts are to be told when it changed.
    async fn update_and_announce(
        &self,
        user: &UserId,
        event: &(dyn Fn(&mut UserPresence, u64) + Send + Sync),
    ) -> Result<Announcement> {
        let now = now_ms();
        // Decided by the attempt that was stored (a change may run once per
        // compare-and-set attempt).
        let push = Mutex::new(None);
        let config = &self.config;
        let change = |record: &mut UserPresence| {
            event(record, now);
            let status = record.status(now, config);
            let told = record.announced.unwrap_or(PresenceState::Offline);
            let mut decided = push.lock().unwrap_or_else(|e| e.into_inner());
            *decided = None;
            if status.state != told {
                record.announced = Some(status.state);
                *decided = Some(status);
            }
        };
        self.store.update(user, &change).await?;
        let push = push.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(Announcement { push })
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
        let device = actor.device.clone();
        let (active, connection) = (req.active, req.connection_id);
        let event = move |record: &mut UserPresence, now: u64| match kind {
            Kind::Connected => record.connect(&device, connection, now),
            Kind::Heartbeat => record.heartbeat(&device, connection, active, now),
            Kind::Disconnected => record.disconnect(&device, connection, now),
            Kind::Unspecified => {}
        };
        let announcement = self.update_and_announce(&actor.user, &event).await?;
        if let Some(presence) = announcement.push {
            tracing::debug!(user = %actor.user, to = ?presence.state, "presence changed");
            self.tell_contacts(&actor.user, presence).await?;
        }
        Ok(PresenceAck {})
    }

    /// Announces offline the users whose devices all expired without a
    /// disconnection (their gateway died), once each across instances.
    /// Returns how many were announced.
    pub async fn sweep(&self) -> Result<usize> {
        let now = now_ms();
        let mut announced = 0;
        for user in self.store.users().await? {
            let Some(record) = self.store.get(&user).await? else {
                continue;
            };
            let told = record.announced.unwrap_or(PresenceState::Offline);
            if record.status(now, &self.config).state == told {
                continue;
            }
            let ttl = self.config.ttl;
            let expire = move |record: &mut UserPresence, now: u64| {
                record.expire(now, ttl);
            };
            let announcement = self.update_and_announce(&user, &expire).await?;
            if let Some(presence) = announcement.push {
                tracing::debug!(%user, to = ?presence.state, "presence expired");
                self.tell_contacts(&user, presence).await?;
                announced += 1;
            }
        }
        Ok(announced)
    }

    /// Publishes `user`'s new presence to everyone who shares a
    /// conversation with them. At most once, as every delivery.
    async fn tell_contacts(&self, user: &UserId, presence: Presence) -> Result<()> {
        let contacts = self.contacts(user).await?;
        if contacts.is_empty() {
            return Ok(());
        }
        let hide = self
            .settings
            .hide_last_seen_many(&[user.as_str()])
            .await?
            .first()
            .copied()
            .unwrap_or(false);
        let item = user_delivery::Item::PresenceChanged(presence_info(
            user,
            presence.hiding_last_seen(hide),
        ));
        self.publish_to(contacts, item).await;
        Ok(())
    }

    /// Publishes one delivery to each of `users` (core NATS: at most once).
    async fn publish_to(&self, users: impl IntoIterator<Item = String>, item: user_delivery::Item) {
        let payload = Bytes::from(UserDelivery { item: Some(item) }.encode_to_vec());
        for user in users {
            let Ok(user) = UserId::parse(user) else {
                continue;
            };
            if let Err(e) = self
                .bus
                .publish(
                    &self.subjects.deliver_user(&user),
                    Headers::new(),
                    payload.clone(),
                )
                .await
            {
                tracing::warn!(error = %e, %user, "presence delivery not published");
            }
        }
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
        if visible.is_empty() {
            return Ok(v1::PresenceResult::default());
        }
        let records = self.store.get_many(&visible).await?;
        let names: Vec<&str> = visible.iter().map(UserId::as_str).collect();
        let hides = self.settings.hide_last_seen_many(&names).await?;
        let now = now_ms();
        let presences = visible
            .iter()
            .zip(records)
            .zip(hides)
            .map(|((user, record), hide)| {
                let presence = record.map_or(Presence::UNKNOWN, |r| r.status(now, &self.config));
                // Users always see their own last-seen.
                let hide = hide && *user != actor.user;
                presence_info(user, presence.hiding_last_seen(hide))
            })
            .collect();
        Ok(v1::PresenceResult { presences })
    }

    /// Relays a typing indicator to the conversation's other members. The
    /// typist must be a member; nothing is stored.
    #[tracing::instrument(skip_all)]
    pub async fn typing(&self, req: wire::TypingRequest) -> Result<PresenceAck> {
        let actor = Actor::from_wire(req.actor)?;
        let typing = req.request.ok_or(Error::Missing("request"))?;
        let conversation = ConversationId::parse(&typing.conversation_id)
            .map_err(|e| Error::invalid("conversation_id", e))?;
        let request = wire::MembershipsRequest {
            user_id: actor.user.to_string(),
            conversation_ids: vec![conversation.to_string()],
        };
        let response: wire::MembershipsResponse =
            self.ask_fanout(FanoutMethod::Memberships, &request).await?;
        let Some(members) = response
            .conversations
            .into_iter()
            .find(|c| c.conversation_id == conversation.to_string())
        else {
            return Err(Error::NotMember(conversation.to_string()));
        };
        let event = v1::TypingEvent {
            conversation_id: conversation.to_string(),
            user_id: actor.user.to_string(),
            typing: typing.typing,
            timeout_ms: u32::try_from(self.config.typing_timeout.as_millis()).unwrap_or(u32::MAX),
        };
        let others = members
            .user_ids
            .into_iter()
            .filter(|u| u.as_str() != actor.user.as_str());
        self.publish_to(others, user_delivery::Item::Typing(event))
            .await;
        Ok(PresenceAck {})
    }

    /// Stores the actor's presence settings.
    #[tracing::instrument(skip_all)]
    pub async fn settings(&self, req: wire::PresenceSettingsRequest) -> Result<PresenceAck> {
        let actor = Actor::from_wire(req.actor)?;
        let settings = req.request.ok_or(Error::Missing("request"))?;
        self.settings
            .set_hide_last_seen(actor.user.as_str(), settings.hide_last_seen)
            .await?;
        Ok(PresenceAck {})
    }
}
