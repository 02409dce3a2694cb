//! The public [`Client`]: ties the crypto machine, the encrypted state and
//! the transport together.
//!
//! Locking: `local` (crypto machine, cursors, dedupe sets) is a tokio mutex
//! held only for local work and persisting, never across a network wait.
//! `send_lock` serializes sends (so one conversation's room-key sharing and
//! Megolm index advance happen in order), `sync_lock` serializes syncs and
//! `keys_lock` key uploads. Answers on the `Connect` stream are routed by the
//! transport task, independently of the task that processes pushes, so a
//! sender waiting for its answer never waits for the receiving path.
//!
//! Files (upload, resume, download) live in `files`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use chappe_proto::ids::{ConversationId, DeviceId, MessageId, UserId};
use chappe_proto::v1::{self as pb, client_frame, server_frame};
use tokio::sync::{Mutex, mpsc};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::{
    CryptoLimits, DecryptedMessage, DeviceAddr, IncomingMessage, Machine, OutgoingMessage,
    Released, VerifiedDevice,
};
use crate::state::{self, STATE_VERSION, SessionToken, StateData, Store, UploadRecord};
use crate::transport::{Link, Push, Rpc, TransportConfig};
use crate::{
    ClientConfig, Conversation, ConversationKind, CryptoError, Error, Event, Events, Presence,
    Result, Sent,
};

mod files;

/// A logged-in device. Cheap to clone; clones share everything, and may be
/// used from several tasks at once (e.g. one listening, one sending).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    me: DeviceAddr,
    ed25519: String,
    rpc: Arc<Rpc>,
    store: Arc<Store>,
    local: Mutex<Local>,
    caches: StdMutex<Caches>,
    send_lock: Mutex<()>,
    sync_lock: Mutex<()>,
    keys_lock: Mutex<()>,
    link: StdMutex<Option<Arc<Link>>>,
    listener: StdMutex<Option<mpsc::Sender<Event>>>,
    /// A catch-up sync is scheduled (see [`Client::schedule_catch_up`]).
    catch_up_scheduled: AtomicBool,
    /// Upload ids being uploaded by this process right now.
    active_uploads: StdMutex<HashSet<String>>,
}

/// Everything persisted, in memory.
struct Local {
    machine: Machine,
    server_url: String,
    cursors: BTreeMap<ConversationId, MessageId>,
    membership_seq: BTreeMap<ConversationId, u64>,
    processed_inbox: Recent,
    seen_messages: Recent,
    /// Unfinished uploads by upload id (see `files`).
    uploads: BTreeMap<String, UploadRecord>,
}

#[derive(Default)]
struct Caches {
    members: HashMap<ConversationId, (Instant, BTreeSet<UserId>)>,
    devices: HashMap<UserId, (Instant, Vec<VerifiedDevice>)>,
}

/// A bounded set that forgets its oldest entries.
struct Recent {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
}

impl Recent {
    fn new(items: impl IntoIterator<Item = String>, cap: usize) -> Self {
        let mut recent = Recent {
            order: VecDeque::new(),
            set: HashSet::new(),
            cap: cap.max(1),
        };
        for item in items {
            recent.insert(item);
        }
        recent
    }

    fn contains(&self, item: &str) -> bool {
        self.set.contains(item)
    }

    /// False if it was already there.
    fn insert(&mut self, item: String) -> bool {
        if self.set.contains(&item) {
            return false;
        }
        self.set.insert(item.clone());
        self.order.push_back(item);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// A fresh 128-bit `client_msg_id`.
fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn crypto_limits(config: &ClientConfig) -> CryptoLimits {
    CryptoLimits {
        rotation: config.rotation.clone(),
        max_olm_sessions_per_device: config.max_olm_sessions_per_device,
        max_pending_messages: config.max_pending_messages,
    }
}

fn transport_config(config: &ClientConfig) -> TransportConfig {
    TransportConfig {
        request_timeout: config.request_timeout,
        connect_timeout: config.connect_timeout,
        backoff_min: config.reconnect_backoff_min,
        backoff_max: config.reconnect_backoff_max,
        ping_interval: config.ping_interval,
        outgoing_buffer: config.outgoing_buffer,
        local_address: config.local_address,
        media_max_message_bytes: config.media_max_message_bytes,
    }
}

fn undecryptable(msg: IncomingMessage, reason: CryptoError) -> Event {
    Event::Undecryptable {
        conversation_id: msg.conversation_id,
        message_id: msg.message_id,
        sender: msg.sender,
        reason,
    }
}

impl Local {
    fn to_state(&self, me: &DeviceAddr, session: Option<SessionToken>) -> StateData {
        StateData {
            version: STATE_VERSION,
            server_url: self.server_url.clone(),
            user_id: me.user_id.to_string(),
            device_id: me.device_id.to_string(),
            session,
            machine: self.machine.pickle(),
            cursors: self
                .cursors
                .iter()
                .map(|(c, m)| (c.to_string(), m.to_string()))
                .collect(),
            membership_seq: self
                .membership_seq
                .iter()
                .map(|(c, s)| (c.to_string(), *s))
                .collect(),
            processed_inbox: self.processed_inbox.order.clone(),
            seen_messages: self.seen_messages.order.clone(),
            uploads: self.uploads.values().cloned().collect(),
        }
    }

    /// Decrypts a message for delivery; one without its room key yet is kept.
    fn decrypt_event(&mut self, msg: IncomingMessage) -> Event {
        match self.machine.decrypt_message(&msg) {
            Ok(m) => Event::Message(m),
            Err(reason @ CryptoError::MissingRoomKey { .. }) => {
                if !self.machine.queue_pending(msg.clone()) {
                    tracing::warn!(message = %msg.message_id, "pending store full; message dropped");
                }
                undecryptable(msg, reason)
            }
            Err(reason) => undecryptable(msg, reason),
        }
    }

    fn advance_cursor(&mut self, conv: ConversationId, to: MessageId) {
        let cursor = self.cursors.entry(conv).or_insert(to);
        if *cursor < to {
            *cursor = to;
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("device", &self.inner.me)
            .field("server_url", &self.inner.config.server_url)
            .finish_non_exhaustive()
    }
}

async fn open_store(
    config: &ClientConfig,
    create: bool,
) -> Result<(Store, Option<Zeroizing<Vec<u8>>>)> {
    let dir = config.state_dir.clone();
    let passphrase = Zeroizing::new(config.passphrase.clone());
    let kdf = config.kdf;
    let lock_wait = config.lock_wait;
    tokio::task::spawn_blocking(move || Store::open(&dir, &passphrase, &kdf, create, lock_wait))
        .await
        .map_err(|e| Error::io(&config.state_dir, std::io::Error::other(e)))?
}

impl Client {
    // --------------------------------------------------------- lifecycle

    /// Logs in `user`'s `device` with the development credential.
    ///
    /// A new state directory gets a new device: account created and saved,
    /// login, signed identity, one-time and fallback keys uploaded. An
    /// existing one is reopened (it must belong to the same user and device),
    /// logged in again if its token is missing or about to expire, and any
    /// keys not yet published are published.
    pub async fn login_dev(config: ClientConfig, user: &str, device: &str) -> Result<Client> {
        config.validate()?;
        let me = DeviceAddr::parse(user, device)?;
        let (store, existing) = open_store(&config, true).await?;
        let client = match existing {
            Some(plaintext) => {
                let client = Self::restore(config, store, &plaintext)?;
                if client.inner.me != me {
                    return Err(Error::StateMismatch {
                        dir: client.inner.config.state_dir.clone(),
                        found: client.inner.me.to_string(),
                        wanted: me.to_string(),
                    });
                }
                let fresh = client
                    .inner
                    .rpc
                    .token()
                    .is_some_and(|t| t.expires_at_ms > chappe_proto::ids::unix_ms() + 60_000);
                if !fresh {
                    client.inner.rpc.login_dev().await?;
                    client.persist_now().await?;
                }
                client
            }
            None => {
                let machine = Machine::new(
                    me.clone(),
                    chappe_proto::ids::unix_ms(),
                    crypto_limits(&config),
                );
                let local = Local {
                    machine,
                    server_url: config.server_url.clone(),
                    cursors: BTreeMap::new(),
                    membership_seq: BTreeMap::new(),
                    processed_inbox: Recent::new([], config.dedupe_window),
                    seen_messages: Recent::new([], config.dedupe_window),
                    uploads: BTreeMap::new(),
                };
                let client = Self::build(config, me, store, local)?;
                // The account is on disk before any of its keys leave.
                client.persist_now().await?;
                client.inner.rpc.login_dev().await?;
                client.persist_now().await?;
                client
            }
        };
        client.maintain_keys().await?;
        Ok(client)
    }

    /// Reopens an existing state directory, without talking to the server.
    /// The stored token is used; if the server refuses it the client logs in
    /// again with the development credential.
    pub async fn open(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let (store, existing) = open_store(&config, false).await?;
        let plaintext = existing.ok_or_else(|| Error::NoState(config.state_dir.clone()))?;
        Self::restore(config, store, &plaintext)
    }

    fn restore(config: ClientConfig, store: Store, plaintext: &[u8]) -> Result<Client> {
        let data: StateData = state::from_json(plaintext)?;
        if data.version != STATE_VERSION {
            return Err(Error::CorruptState(format!(
                "state version {} (this client reads {STATE_VERSION})",
                data.version
            )));
        }
        let me = DeviceAddr::parse(&data.user_id, &data.device_id)?;
        let machine = Machine::from_pickle(data.machine, crypto_limits(&config))?;
        if machine.me() != &me {
            return Err(Error::CorruptState(
                "account belongs to another device".into(),
            ));
        }
        let mut cursors = BTreeMap::new();
        for (c, m) in data.cursors {
            cursors.insert(ConversationId::parse(&c)?, MessageId::parse(&m)?);
        }
        let mut membership_seq = BTreeMap::new();
        for (c, s) in data.membership_seq {
            membership_seq.insert(ConversationId::parse(&c)?, s);
        }
        let local = Local {
            machine,
            server_url: config.server_url.clone(),
            cursors,
            membership_seq,
            processed_inbox: Recent::new(data.processed_inbox, config.dedupe_window),
            seen_messages: Recent::new(data.seen_messages, config.dedupe_window),
            uploads: data
                .uploads
                .iter()
                .map(|u| (u.upload_id.clone(), u.clone()))
                .collect(),
        };
        let client = Self::build(config, me, store, local)?;
        client.inner.rpc.set_token(data.session)?;
        Ok(client)
    }

    fn build(
        mut config: ClientConfig,
        me: DeviceAddr,
        store: Store,
        local: Local,
    ) -> Result<Client> {
        let urls: Vec<&str> = std::iter::once(&config.server_url)
            .chain(&config.failover_urls)
            .map(String::as_str)
            .collect();
        let rpc = Rpc::new(&urls, me.clone(), transport_config(&config))?;
        config.passphrase.zeroize();
        let ed25519 = local.machine.own_device().ed25519.to_base64();
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                me,
                ed25519,
                rpc: Arc::new(rpc),
                store: Arc::new(store),
                local: Mutex::new(local),
                caches: StdMutex::new(Caches::default()),
                send_lock: Mutex::new(()),
                sync_lock: Mutex::new(()),
                keys_lock: Mutex::new(()),
                link: StdMutex::new(None),
                listener: StdMutex::new(None),
                catch_up_scheduled: AtomicBool::new(false),
                active_uploads: StdMutex::new(HashSet::new()),
            }),
        })
    }

    pub fn user_id(&self) -> &UserId {
        &self.inner.me.user_id
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.inner.me.device_id
    }

    /// This device's Ed25519 key (base64): its fingerprint.
    pub fn ed25519_key(&self) -> &str {
        &self.inner.ed25519
    }

    /// Opens the `Connect` stream (kept open, reconnecting with backoff) and
    /// returns the events of this device: [`Event::Connected`] once the
    /// stream is up, then what a sync finds, then deliveries as they come.
    ///
    /// Calling it again replaces the previous [`Events`] (which then ends).
    /// While no `Events` is alive, pushes are ignored and left for the next
    /// [`Client::sync`] (cursors only move on sync, so nothing is lost).
    pub async fn connect(&self) -> Result<Events> {
        let (tx, rx) = mpsc::channel(self.inner.config.event_buffer);
        *self
            .inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let link = self.link();
        if link.is_connected() {
            // Catch the new listener up; the next `Connected` would do it too.
            let client = self.clone();
            tokio::spawn(async move { client.sync_and_emit(&link).await });
        }
        Ok(Events { rx })
    }

    /// Closes the `Connect` stream and ends the current [`Events`]. Any later
    /// call that needs the stream opens it again.
    pub fn disconnect(&self) {
        self.inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.inner
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    fn link(&self) -> Arc<Link> {
        let mut slot = self.inner.link.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = slot.as_ref() {
            return link.clone();
        }
        let (link, pushes) = Link::start(self.inner.rpc.clone());
        let link = Arc::new(link);
        *slot = Some(link.clone());
        tokio::spawn(process_pushes(
            Arc::downgrade(&self.inner),
            Arc::downgrade(&link),
            pushes,
        ));
        link
    }

    fn has_listener(&self) -> bool {
        self.inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|tx| !tx.is_closed())
    }

    async fn emit(&self, event: Event) {
        let tx = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(tx) = tx
            && tx.send(event).await.is_err()
        {
            let mut slot = self
                .inner
                .listener
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|cur| cur.same_channel(&tx)) {
                *slot = None;
            }
        }
    }

    // ------------------------------------------------------- persistence

    /// Writes the whole state, encrypted, atomically. Called with the state
    /// lock held, so writes are ordered.
    async fn persist(&self, local: &Local) -> Result<()> {
        let data = local.to_state(&self.inner.me, self.inner.rpc.token());
        let plaintext = Zeroizing::new(
            serde_json::to_vec(&data).map_err(|e| Error::CorruptState(e.to_string()))?,
        );
        drop(data);
        // Numbered while the state lock is held: if this future is dropped
        // and the write finishes late, it cannot replace a newer state.
        let generation = self.inner.store.next_generation();
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.save_ordered(generation, &plaintext))
            .await
            .map_err(|e| Error::io(self.inner.store.dir(), std::io::Error::other(e)))?
    }

    async fn persist_now(&self) -> Result<()> {
        let local = self.inner.local.lock().await;
        self.persist(&local).await
    }

    // -------------------------------------------------------------- keys

    /// Publishes keys not yet published and tops one-time keys up when the
    /// server holds fewer than half of the target.
    async fn maintain_keys(&self) -> Result<()> {
        let _keys = self.inner.keys_lock.lock().await;
        let published = self
            .inner
            .local
            .lock()
            .await
            .machine
            .device_keys_published();
        let count = if published {
            self.inner
                .rpc
                .upload_keys(pb::UploadKeysRequest::default())
                .await?
                .one_time_key_count
        } else {
            0
        };
        let request = {
            let mut local = self.inner.local.lock().await;
            let request = local.machine.upload_request(
                Some(count),
                self.inner.config.one_time_keys_target,
                chappe_proto::ids::unix_ms(),
            );
            if request.is_some() {
                // Private halves on disk before the public halves leave.
                self.persist(&local).await?;
            }
            request
        };
        if let Some(request) = request {
            let uploaded = request.one_time_keys.len();
            self.inner.rpc.upload_keys(request).await?;
            let mut local = self.inner.local.lock().await;
            local.machine.mark_published();
            self.persist(&local).await?;
            tracing::debug!(uploaded, "keys published");
        }
        Ok(())
    }

    /// Fetches and verifies the devices of `users`, refreshing the cache.
    async fn fetch_devices(&self, users: &BTreeSet<UserId>) -> Result<Vec<VerifiedDevice>> {
        let response = self
            .inner
            .rpc
            .query_devices(pb::QueryDevicesRequest {
                user_ids: users.iter().map(ToString::to_string).collect(),
            })
            .await?;
        let list = self
            .inner
            .local
            .lock()
            .await
            .machine
            .observe_devices(users, &response.devices);
        for rejected in &list.rejected {
            tracing::warn!(reason = %rejected, "device refused");
        }
        let now = Instant::now();
        let mut caches = self.inner.caches.lock().unwrap_or_else(|e| e.into_inner());
        for user in users {
            let devices = list
                .devices
                .iter()
                .filter(|d| &d.addr.user_id == user)
                .cloned()
                .collect();
            caches.devices.insert(user.clone(), (now, devices));
        }
        Ok(list.devices)
    }

    /// The verified devices of `users`, from the cache unless stale or `fresh`.
    async fn devices_of(
        &self,
        users: &BTreeSet<UserId>,
        fresh: bool,
    ) -> Result<Vec<VerifiedDevice>> {
        let ttl = self.inner.config.device_cache_ttl;
        let mut devices = Vec::new();
        let mut missing = BTreeSet::new();
        {
            let caches = self.inner.caches.lock().unwrap_or_else(|e| e.into_inner());
            for user in users {
                match caches.devices.get(user) {
                    Some((at, cached)) if !fresh && at.elapsed() < ttl => {
                        devices.extend(cached.iter().cloned());
                    }
                    _ => {
                        missing.insert(user.clone());
                    }
                }
            }
        }
        if !missing.is_empty() {
            devices.extend(self.fetch_devices(&missing).await?);
        }
        Ok(devices)
    }

    /// The members of `conv`, from the cache unless stale or `fresh`.
    async fn members_of(&self, conv: &ConversationId, fresh: bool) -> Result<BTreeSet<UserId>> {
        let ttl = self.inner.config.device_cache_ttl;
        if !fresh {
            let caches = self.inner.caches.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, members)) = caches.members.get(conv)
                && at.elapsed() < ttl
            {
                return Ok(members.clone());
            }
        }
        let conversation = self.conversation(conv).await?;
        Ok(conversation.members.into_iter().collect())
    }

    fn cache_members(&self, conversation: &Conversation) {
        self.inner
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .members
            .insert(
                conversation.id,
                (
                    Instant::now(),
                    conversation.members.iter().cloned().collect(),
                ),
            );
    }

    fn forget_members(&self, conv: &ConversationId) {
        self.inner
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .members
            .remove(conv);
    }

    // ----------------------------------------------------- conversations

    /// Creates a conversation with `others` (the caller is always a member).
    pub async fn create_conversation(
        &self,
        kind: ConversationKind,
        others: &[UserId],
    ) -> Result<Conversation> {
        let response = self
            .inner
            .rpc
            .create_conversation(pb::CreateConversationRequest {
                kind: kind.to_proto() as i32,
                member_user_ids: others.iter().map(ToString::to_string).collect(),
            })
            .await?;
        let conversation = Conversation::try_from(
            response
                .conversation
                .as_ref()
                .ok_or_else(|| Error::protocol("CreateConversation without a conversation"))?,
        )?;
        self.cache_members(&conversation);
        Ok(conversation)
    }

    /// The caller's conversations.
    pub async fn conversations(&self) -> Result<Vec<Conversation>> {
        let response = self.inner.rpc.list_conversations().await?;
        let conversations = response
            .conversations
            .iter()
            .map(Conversation::try_from)
            .collect::<Result<Vec<_>>>()?;
        for c in &conversations {
            self.cache_members(c);
        }
        Ok(conversations)
    }

    /// One conversation, fetched from the server.
    pub async fn conversation(&self, id: &ConversationId) -> Result<Conversation> {
        let response = self
            .inner
            .rpc
            .get_conversation(pb::GetConversationRequest {
                conversation_id: id.to_string(),
            })
            .await?;
        let conversation = Conversation::try_from(
            response
                .conversation
                .as_ref()
                .ok_or_else(|| Error::protocol("GetConversation without a conversation"))?,
        )?;
        if conversation.id != *id {
            return Err(Error::protocol(
                "GetConversation answered another conversation",
            ));
        }
        self.cache_members(&conversation);
        Ok(conversation)
    }

    async fn update_membership(
        &self,
        id: &ConversationId,
        op: pb::MembershipOp,
        target: &UserId,
    ) -> Result<Conversation> {
        self.forget_members(id);
        let response = self
            .inner
            .rpc
            .update_membership(pb::UpdateMembershipRequest {
                conversation_id: id.to_string(),
                op: op as i32,
                target_user_id: target.to_string(),
            })
            .await?;
        let conversation = Conversation::try_from(
            response
                .conversation
                .as_ref()
                .ok_or_else(|| Error::protocol("UpdateMembership without a conversation"))?,
        )?;
        self.cache_members(&conversation);
        Ok(conversation)
    }

    /// Adds `user` to a group. They can read messages sent from now on.
    pub async fn add_member(&self, id: &ConversationId, user: &UserId) -> Result<Conversation> {
        self.update_membership(id, pb::MembershipOp::Add, user)
            .await
    }

    /// Removes `user` from a group. The next message rotates the room key,
    /// so they cannot read what follows.
    pub async fn remove_member(&self, id: &ConversationId, user: &UserId) -> Result<Conversation> {
        self.update_membership(id, pb::MembershipOp::Remove, user)
            .await
    }

    /// Leaves a group.
    pub async fn leave(&self, id: &ConversationId) -> Result<Conversation> {
        let me = self.inner.me.user_id.clone();
        self.update_membership(id, pb::MembershipOp::Leave, &me)
            .await
    }

    // ----------------------------------------------------------- sending

    /// Encrypts and sends a text message; returns the server's receipt.
    ///
    /// First every current member device (the members' devices as keydir
    /// publishes them, this user's other devices included) that lacks the
    /// conversation's current room key gets it over Olm, in `SendToDevice`
    /// batches the server confirmed; then the Megolm ciphertext is sent.
    /// State is persisted before each ciphertext leaves. A retryable failure
    /// (lost answer, reconnect, `RESOURCE_EXHAUSTED`) is retried with the
    /// same `client_msg_id` and ciphertext, which the server stores once.
    pub async fn send_text(&self, conversation: &ConversationId, text: &str) -> Result<Sent> {
        if text.is_empty() {
            return Err(Error::InvalidInput("empty message".into()));
        }
        if text.len() > self.inner.config.max_text_bytes {
            return Err(Error::InvalidInput(format!(
                "message of {} bytes; the limit is {}",
                text.len(),
                self.inner.config.max_text_bytes
            )));
        }
        self.send_encrypted(conversation, |machine| {
            machine.encrypt_text(conversation, text, chappe_proto::ids::unix_ms())
        })
        .await
    }

    /// Shares the room key, encrypts with `encrypt`, persists, sends, and
    /// returns the receipt (see [`Client::send_text`]).
    async fn send_encrypted(
        &self,
        conversation: &ConversationId,
        encrypt: impl FnOnce(&mut Machine) -> Result<OutgoingMessage, CryptoError>,
    ) -> Result<Sent> {
        let link = self.link();
        let _send = self.inner.send_lock.lock().await;
        self.share_room_key(&link, conversation).await?;
        let outgoing = {
            let mut local = self.inner.local.lock().await;
            let outgoing = encrypt(&mut local.machine)?;
            self.persist(&local).await?;
            outgoing
        };
        let client_msg_id = random_id();
        let body = client_frame::Body::Send(pb::SendMessage {
            conversation_id: conversation.to_string(),
            client_msg_id: client_msg_id.clone(),
            ciphertext: outgoing.ciphertext,
            session_id: outgoing.session_id,
        });
        let server_frame::Body::Sent(result) = self.request_retrying(&link, body).await? else {
            return Err(Error::protocol("expected a SendResult"));
        };
        if (!result.conversation_id.is_empty()
            && result.conversation_id != conversation.to_string())
            || (!result.client_msg_id.is_empty() && result.client_msg_id != client_msg_id)
        {
            return Err(Error::protocol("SendResult for another send"));
        }
        let message_id = MessageId::parse(&result.message_id)?;
        // Our own message is not an incoming event.
        self.inner
            .local
            .lock()
            .await
            .seen_messages
            .insert(message_id.to_string());
        Ok(Sent {
            conversation_id: *conversation,
            message_id,
            client_msg_id,
            sent_at_ms: result.sent_at_ms,
            duplicate: result.duplicate,
        })
    }

    /// Sends one frame, retrying retryable failures with the same frame.
    async fn request_retrying(
        &self,
        link: &Link,
        body: client_frame::Body,
    ) -> Result<server_frame::Body> {
        let config = &self.inner.config;
        let mut delay = config.reconnect_backoff_min;
        let mut attempt = 1;
        loop {
            match link.request(body.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(e) if e.is_retryable() && attempt < config.send_attempts => {
                    let wait = e.retry_after().unwrap_or(delay);
                    tracing::warn!(attempt, error = %e, ?wait, "send failed; retrying with the same id");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(config.reconnect_backoff_max);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes sure every current member device holds the current room key of
    /// `conv`, rotating it when the policy says so.
    async fn share_room_key(&self, link: &Link, conv: &ConversationId) -> Result<()> {
        let now = chappe_proto::ids::unix_ms();
        let due = self
            .inner
            .local
            .lock()
            .await
            .machine
            .rotation_due(conv, None, None, now);
        let mut fresh = due.is_some();
        let mut members = self.members_of(conv, fresh).await?;
        let mut devices = self.devices_of(&members, fresh).await?;
        if !fresh {
            let due = self.inner.local.lock().await.machine.rotation_due(
                conv,
                Some(&members),
                Some(&devices),
                now,
            );
            if due.is_some() {
                // About to rotate on cached data: share the new key with the
                // devices of now.
                fresh = true;
                members = self.members_of(conv, fresh).await?;
                devices = self.devices_of(&members, fresh).await?;
            }
        }
        let missing = {
            let mut local = self.inner.local.lock().await;
            if let Some(reason) = local.machine.ensure_outbound(conv, &members, &devices, now) {
                tracing::debug!(conversation = %conv, ?reason, "new outbound session");
            }
            let needing = local.machine.devices_needing_key(conv, &devices);
            local.machine.devices_without_olm(&needing)
        };
        if !missing.is_empty() {
            self.open_olm_sessions(&missing).await?;
        }
        let batch = {
            let mut local = self.inner.local.lock().await;
            let needing = local.machine.devices_needing_key(conv, &devices);
            if needing.is_empty() {
                return Ok(());
            }
            let batch =
                local
                    .machine
                    .encrypt_room_keys(conv, &needing, chappe_proto::ids::unix_ms())?;
            // Olm ratchets advanced: on disk before the ciphertexts leave.
            self.persist(&local).await?;
            batch
        };
        for skipped in &batch.skipped {
            tracing::warn!(reason = %skipped, "device not given the room key");
        }
        let size = self.inner.config.max_to_device_batch;
        for (messages, recipients) in batch
            .messages
            .chunks(size)
            .zip(batch.recipients.chunks(size))
        {
            let body = client_frame::Body::SendToDevice(pb::SendToDevice {
                client_msg_id: random_id(),
                messages: messages.to_vec(),
            });
            let server_frame::Body::ToDeviceSent(_) = self.request_retrying(link, body).await?
            else {
                return Err(Error::protocol("expected a SendToDeviceResult"));
            };
            self.inner
                .local
                .lock()
                .await
                .machine
                .mark_shared(conv, &batch.session_id, recipients);
        }
        Ok(())
    }

    /// Claims a key for each device and opens Olm sessions with them.
    async fn open_olm_sessions(&self, devices: &[VerifiedDevice]) -> Result<()> {
        let response = self
            .inner
            .rpc
            .claim_keys(pb::ClaimKeysRequest {
                devices: devices.iter().map(|d| d.addr.to_proto()).collect(),
            })
            .await?;
        for r in &response.unavailable {
            tracing::warn!(user = %r.user_id, device = %r.device_id, "no one-time key left");
        }
        let mut local = self.inner.local.lock().await;
        for claimed in &response.keys {
            let device = DeviceAddr::parse(&claimed.user_id, &claimed.device_id)
                .ok()
                .and_then(|addr| devices.iter().find(|d| d.addr == addr));
            let Some(device) = device else {
                tracing::warn!(user = %claimed.user_id, device = %claimed.device_id, "key for a device not asked for");
                continue;
            };
            if let Err(e) =
                local
                    .machine
                    .create_outbound_olm(device, claimed, chappe_proto::ids::unix_ms())
            {
                tracing::warn!(reason = %e, "claimed key refused");
            }
        }
        // The new sessions are persisted with the room keys they encrypt.
        Ok(())
    }

    // --------------------------------------------------------- receiving

    /// Fetches what arrived since the last sync: room keys first (stored,
    /// persisted, then acknowledged), then conversation messages, which are
    /// decrypted and returned (undecryptable ones are kept for when their
    /// key arrives). Messages already delivered are not returned again.
    pub async fn sync(&self) -> Result<Vec<Event>> {
        let link = self.link();
        self.sync_with(&link).await
    }

    async fn sync_and_emit(&self, link: &Link) {
        if !self.has_listener() {
            return;
        }
        match self.sync_with(link).await {
            Ok(events) => {
                for event in events {
                    self.emit(event).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "sync failed"),
        }
    }

    async fn sync_with(&self, link: &Link) -> Result<Vec<Event>> {
        let _sync = self.inner.sync_lock.lock().await;
        let mut events = Vec::new();
        let mut prekeys = false;
        for round in 0..self.inner.config.max_sync_rounds {
            let cursors = self
                .inner
                .local
                .lock()
                .await
                .cursors
                .iter()
                .map(|(c, m)| pb::ConversationCursor {
                    conversation_id: c.to_string(),
                    message_id: m.to_string(),
                })
                .collect();
            let request = client_frame::Body::Sync(pb::SyncRequest {
                cursors,
                limit: self.inner.config.sync_page_limit,
                // Later rounds page on from what the first one returned.
                continuation: round > 0,
            });
            let response = match link.request(request).await {
                Ok(server_frame::Body::Sync(response)) => response,
                Ok(_) => return Err(Error::protocol("expected a SyncResponse")),
                Err(e) if round > 0 => {
                    // Keep what earlier rounds delivered; the next sync goes on.
                    tracing::warn!(error = %e, "sync interrupted");
                    break;
                }
                Err(e) => return Err(e),
            };
            prekeys |= response.to_device.iter().any(|e| e.olm_type == 0);
            let (to_device_events, acks) = self.process_to_device(response.to_device).await?;
            events.extend(to_device_events);
            if !acks.is_empty()
                && let Err(e) = self.ack(link, acks).await
            {
                tracing::warn!(error = %e, "ack failed; the server will deliver again");
            }
            let (message_events, limited) = self.process_updates(response.conversations).await?;
            events.extend(message_events);
            if !(limited || response.to_device_limited) {
                break;
            }
        }
        if prekeys && let Err(e) = self.maintain_keys().await {
            tracing::warn!(error = %e, "one-time key top-up failed");
        }
        Ok(events)
    }

    async fn ack(&self, link: &Link, inbox_ids: Vec<String>) -> Result<()> {
        let body = client_frame::Body::AckToDevice(pb::AckToDevice { inbox_ids });
        match link.request(body).await? {
            server_frame::Body::Acked(_) => Ok(()),
            _ => Err(Error::protocol("expected an AckToDeviceResult")),
        }
    }

    /// Decrypts to-device events (room keys), persists, and returns the
    /// events they produced and the inbox ids to acknowledge. Events from a
    /// sender whose keys cannot be fetched now are left for a later try.
    async fn process_to_device(
        &self,
        batch: Vec<pb::ToDeviceEvent>,
    ) -> Result<(Vec<Event>, Vec<String>)> {
        if batch.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let unknown: BTreeSet<UserId> = {
            let local = self.inner.local.lock().await;
            batch
                .iter()
                .filter(|e| !local.processed_inbox.contains(&e.inbox_id))
                .filter_map(|e| DeviceAddr::from_proto(e.sender.as_ref()).ok())
                .filter(|a| local.machine.known_device(a).is_none())
                .map(|a| a.user_id)
                .collect()
        };
        let mut unreachable = BTreeSet::new();
        if !unknown.is_empty()
            && let Err(e) = self.fetch_devices(&unknown).await
        {
            tracing::warn!(error = %e, "cannot fetch the keys of to-device senders");
            unreachable = unknown;
        }
        let mut local = self.inner.local.lock().await;
        let mut events = Vec::new();
        let mut acks = Vec::new();
        for event in batch {
            if event.inbox_id.is_empty() {
                tracing::warn!("to-device event without an inbox id");
                continue;
            }
            if local.processed_inbox.contains(&event.inbox_id) {
                acks.push(event.inbox_id);
                continue;
            }
            let outcome = match DeviceAddr::from_proto(event.sender.as_ref()) {
                Err(e) => Err((None, CryptoError::MalformedPayload(e.to_string()))),
                Ok(sender) => match local.machine.known_device(&sender).cloned() {
                    None if unreachable.contains(&sender.user_id) => continue,
                    None => Err((
                        Some(sender.clone()),
                        CryptoError::UnknownDevice {
                            device: sender.to_string(),
                        },
                    )),
                    Some(device) => local
                        .machine
                        .receive_to_device(
                            &sender,
                            &device,
                            event.olm_type,
                            &event.ciphertext,
                            chappe_proto::ids::unix_ms(),
                        )
                        .map_err(|reason| (Some(sender), reason)),
                },
            };
            match outcome {
                Ok(received) => {
                    tracing::debug!(from = %received.from, session = %received.session_id, "room key received");
                    for released in received.released {
                        events.push(match released {
                            Released::Decrypted(m) => Event::Message(m),
                            Released::Refused(m, reason) => undecryptable(m, reason),
                        });
                    }
                }
                Err((sender, reason)) => {
                    tracing::warn!(?sender, %reason, "to-device message refused");
                    events.push(Event::ToDeviceRejected { sender, reason });
                }
            }
            local.processed_inbox.insert(event.inbox_id.clone());
            acks.push(event.inbox_id);
        }
        // Acknowledged only once what they brought is on disk.
        self.persist(&local).await?;
        Ok((events, acks))
    }

    /// Decrypts synced messages and advances the cursors; persists.
    async fn process_updates(
        &self,
        updates: Vec<pb::ConversationUpdate>,
    ) -> Result<(Vec<Event>, bool)> {
        if updates.is_empty() {
            return Ok((Vec::new(), false));
        }
        let mut events = Vec::new();
        let mut limited = false;
        let mut changed = Vec::new();
        {
            let mut local = self.inner.local.lock().await;
            for update in updates {
                limited |= update.limited;
                let conv_id = match update.conversation.as_ref().map(Conversation::try_from) {
                    Some(Ok(conversation)) => {
                        let previous = local
                            .membership_seq
                            .insert(conversation.id, conversation.membership_seq);
                        if previous != Some(conversation.membership_seq) {
                            changed.push(conversation.id);
                            events.push(Event::ConversationUpdated(conversation.clone()));
                        }
                        conversation.id
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "malformed conversation in sync");
                        continue;
                    }
                    // No description: file the messages under their own id.
                    None => match update
                        .messages
                        .first()
                        .map(|m| ConversationId::parse(&m.conversation_id))
                    {
                        Some(Ok(id)) => id,
                        _ => continue,
                    },
                };
                for message in &update.messages {
                    let msg = match IncomingMessage::try_from(message) {
                        Ok(m) if m.conversation_id == conv_id => m,
                        Ok(_) => {
                            tracing::warn!("synced message filed under another conversation");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "malformed message in sync");
                            continue;
                        }
                    };
                    local.advance_cursor(conv_id, msg.message_id);
                    if !local.seen_messages.insert(msg.message_id.to_string()) {
                        continue;
                    }
                    events.push(local.decrypt_event(msg));
                }
            }
            self.persist(&local).await?;
        }
        for conv in changed {
            self.forget_members(&conv);
        }
        Ok((events, limited))
    }

    async fn on_push(&self, link: &Link, push: Push) {
        match push {
            Push::Connected => {
                self.emit(Event::Connected).await;
                self.sync_and_emit(link).await;
                if let Err(e) = self.maintain_keys().await {
                    tracing::warn!(error = %e, "key maintenance failed");
                }
            }
            Push::Disconnected(reason) => self.emit(Event::Disconnected { reason }).await,
            Push::ConversationChanged(c) => match Conversation::try_from(&c) {
                // The next send sees the new members: a member who left
                // rotates the room key, a new one gets it.
                Ok(conversation) => {
                    self.cache_members(&conversation);
                    if self.has_listener() {
                        self.emit(Event::ConversationUpdated(conversation)).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "malformed conversation pushed"),
            },
            Push::DeviceListChanged(user) => {
                // Fetched again, and verified, before the next room key.
                if let Ok(user) = UserId::parse(user) {
                    self.inner
                        .caches
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .devices
                        .remove(&user);
                    if self.has_listener() {
                        self.emit(Event::DeviceListChanged { user_id: user }).await;
                    }
                }
            }
            Push::PresenceChanged(info) => {
                if !self.has_listener() {
                    return;
                }
                match Presence::try_from(&info) {
                    Ok(presence) => self.emit(Event::PresenceChanged(presence)).await,
                    Err(e) => tracing::warn!(error = %e, "malformed presence pushed"),
                }
            }
            Push::Typing(t) => {
                if !self.has_listener() {
                    return;
                }
                match (
                    ConversationId::parse(&t.conversation_id),
                    UserId::parse(t.user_id.as_str()),
                ) {
                    (Ok(conversation_id), Ok(user_id)) => {
                        self.emit(Event::Typing {
                            conversation_id,
                            user_id,
                            typing: t.typing,
                            timeout: Duration::from_millis(u64::from(t.timeout_ms)),
                        })
                        .await;
                    }
                    _ => tracing::warn!("malformed typing event pushed"),
                }
            }
            Push::ToDevice(event) => {
                // Without a listener, leave it in the inbox for the next
                // sync, which returns what its room key unlocks.
                if !self.has_listener() {
                    return;
                }
                let prekey = event.olm_type == 0;
                match self.process_to_device(vec![event]).await {
                    Ok((events, acks)) => {
                        if !acks.is_empty()
                            && let Err(e) = self.ack(link, acks).await
                        {
                            tracing::warn!(error = %e, "ack failed; the server will deliver again");
                        }
                        for event in events {
                            self.emit(event).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "to-device processing failed"),
                }
                if prekey && let Err(e) = self.maintain_keys().await {
                    tracing::warn!(error = %e, "one-time key top-up failed");
                }
            }
            Push::Message(message) => {
                // Without a listener, leave it to the next sync (cursors only
                // move on sync, so nothing is lost).
                if !self.has_listener() {
                    return;
                }
                let msg = match IncomingMessage::try_from(&message) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "malformed pushed message");
                        return;
                    }
                };
                let event = {
                    let mut local = self.inner.local.lock().await;
                    if !local.seen_messages.insert(msg.message_id.to_string()) {
                        return;
                    }
                    local.decrypt_event(msg)
                };
                let missing_key = matches!(
                    &event,
                    Event::Undecryptable {
                        reason: CryptoError::MissingRoomKey { .. },
                        ..
                    }
                );
                self.emit(event).await;
                if missing_key {
                    self.schedule_catch_up();
                }
            }
        }
    }

    /// A message arrived before its room key. The key normally follows at
    /// once (it travels on another path), but its push may have been lost
    /// (pushes are at most once; the inbox is the record): after
    /// `missing_key_sync_delay`, sync, which fetches the inbox and delivers
    /// what the key unlocks. One catch-up at a time, however many messages
    /// wait.
    fn schedule_catch_up(&self) {
        if self.inner.catch_up_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let delay = self.inner.config.missing_key_sync_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            inner.catch_up_scheduled.store(false, Ordering::Release);
            let link = inner.link.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(link) = link {
                Client { inner }.sync_and_emit(&link).await;
            }
        });
    }

    // ---------------------------------------------------- presence, typing

    /// The presence of `users`. Only users who share a conversation with
    /// this one (and this user) come back: the others are left out, whether
    /// or not they exist.
    pub async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let link = self.link();
        let body = client_frame::Body::PresenceQuery(pb::PresenceQuery {
            user_ids: users.iter().map(ToString::to_string).collect(),
        });
        let server_frame::Body::Presence(result) = self.request_retrying(&link, body).await? else {
            return Err(Error::protocol("expected a PresenceResult"));
        };
        result.presences.iter().map(Presence::try_from).collect()
    }

    /// Tells the members of `conversation` connected now that this user is
    /// typing (or stopped). Nothing is stored; members see it as
    /// [`Event::Typing`] for the server's timeout unless told again.
    pub async fn set_typing(&self, conversation: &ConversationId, typing: bool) -> Result<()> {
        let link = self.link();
        let body = client_frame::Body::Typing(pb::Typing {
            conversation_id: conversation.to_string(),
            typing,
        });
        match self.request_retrying(&link, body).await? {
            server_frame::Body::Accepted(_) => Ok(()),
            _ => Err(Error::protocol("expected Accepted")),
        }
    }

    /// Hides (or shows again) this user's last-seen time from others; they
    /// still see whether the user is online.
    pub async fn set_hide_last_seen(&self, hide: bool) -> Result<()> {
        let link = self.link();
        let body = client_frame::Body::PresenceSettings(pb::PresenceSettings {
            hide_last_seen: hide,
        });
        match self.request_retrying(&link, body).await? {
            server_frame::Body::Accepted(_) => Ok(()),
            _ => Err(Error::protocol("expected Accepted")),
        }
    }

    // ----------------------------------------------------------- history

    /// One message of `conversation`, fetched from the server and
    /// decrypted; `None` if the conversation has no message with that id.
    /// A message whose room key this device lacks is an
    /// [`Error::Crypto`] (a [`Client::sync`] first fetches pending keys).
    pub async fn message(
        &self,
        conversation: &ConversationId,
        id: &MessageId,
    ) -> Result<Option<DecryptedMessage>> {
        // History bounds are exclusive: start just before the id.
        let from = match id.as_u128().checked_sub(1) {
            Some(before) => MessageId::from_u128(before).to_string(),
            None => String::new(),
        };
        let response = self
            .inner
            .rpc
            .history(pb::HistoryRequest {
                conversation_id: conversation.to_string(),
                from_message_id: from,
                direction: pb::Direction::Forward as i32,
                limit: 1,
            })
            .await?;
        let Some(raw) = response.messages.first() else {
            return Ok(None);
        };
        let msg = IncomingMessage::try_from(raw)?;
        if msg.message_id != *id {
            return Ok(None);
        }
        if msg.conversation_id != *conversation {
            return Err(Error::protocol(
                "history returned another conversation's message",
            ));
        }
        let mut local = self.inner.local.lock().await;
        let decrypted = local.machine.decrypt_message(&msg)?;
        local.seen_messages.insert(msg.message_id.to_string());
        self.persist(&local).await?;
        Ok(Some(decrypted))
    }

    /// The newest `limit` messages of a conversation that this device can
    /// read, oldest first. Messages whose room key has not arrived are kept
    /// and delivered as [`Event::Message`] when it does.
    pub async fn history(
        &self,
        conversation: &ConversationId,
        limit: usize,
    ) -> Result<Vec<DecryptedMessage>> {
        let mut raw = Vec::new();
        let mut from = String::new();
        let mut complete = false;
        while raw.len() < limit {
            let want = u32::try_from(limit - raw.len()).unwrap_or(u32::MAX);
            let response = self
                .inner
                .rpc
                .history(pb::HistoryRequest {
                    conversation_id: conversation.to_string(),
                    from_message_id: from.clone(),
                    direction: pb::Direction::Backward as i32,
                    limit: want,
                })
                .await?;
            let got = response.messages.len();
            raw.extend(response.messages);
            if response.next_from.is_empty() {
                complete = true;
                break;
            }
            if got == 0 {
                break;
            }
            from = response.next_from;
        }
        if raw.len() > limit {
            raw.truncate(limit);
            complete = false;
        }
        let mut messages: Vec<IncomingMessage> = Vec::with_capacity(raw.len());
        for m in &raw {
            match IncomingMessage::try_from(m) {
                Ok(msg) if msg.conversation_id == *conversation => messages.push(msg),
                Ok(_) => tracing::warn!("history returned another conversation's message"),
                Err(e) => tracing::warn!(error = %e, "malformed message in history"),
            }
        }
        messages.sort_by_key(|m| m.message_id);
        let mut local = self.inner.local.lock().await;
        let contiguous = complete
            || match (local.cursors.get(conversation), messages.first()) {
                (Some(cursor), Some(oldest)) => oldest.message_id <= *cursor,
                _ => false,
            };
        if contiguous && let Some(newest) = messages.last() {
            local.advance_cursor(*conversation, newest.message_id);
        }
        let mut out = Vec::with_capacity(messages.len());
        for msg in messages {
            local.seen_messages.insert(msg.message_id.to_string());
            match local.decrypt_event(msg) {
                Event::Message(m) => out.push(m),
                Event::Undecryptable {
                    message_id, reason, ..
                } => tracing::debug!(message = %message_id, %reason, "history message unreadable"),
                _ => {}
            }
        }
        self.persist(&local).await?;
        Ok(out)
    }
}

/// The task that handles what the `Connect` stream pushes. It holds the
/// client weakly: dropping the last [`Client`] ends it.
async fn process_pushes(
    inner: Weak<Inner>,
    link: Weak<Link>,
    mut pushes: mpsc::UnboundedReceiver<Push>,
) {
    while let Some(push) = pushes.recv().await {
        let (Some(inner), Some(link)) = (inner.upgrade(), link.upgrade()) else {
            break;
        };
        Client { inner }.on_push(&link, push).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_forgets_the_oldest() {
        let mut r = Recent::new(["a".to_owned()], 2);
        assert!(!r.insert("a".into()));
        assert!(r.insert("b".into()));
        assert!(r.insert("c".into()));
        assert!(!r.contains("a"));
        assert!(r.contains("b") && r.contains("c"));
    }

    #[test]
    fn client_msg_ids_are_valid_and_distinct() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(chappe_proto::ids::ClientMsgId::parse(a.as_str()).is_ok());
        assert_ne!(a, random_id());
    }
}
