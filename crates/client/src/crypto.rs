//! The end-to-end crypto state machine: pure, I/O-free, over vodozemac.
//!
//! A [`Machine`] is one device's crypto: its Olm [`Account`], its Olm
//! sessions with other devices (keyed by their Curve25519 identity key), one
//! outbound Megolm session per conversation with its sharing record, the
//! inbound Megolm sessions it received (with the device they came from), the
//! device keys it has verified (trust on first use), and the conversation
//! messages waiting for a room key. It never touches the network or the disk:
//! the caller feeds it what the server returned and sends what it produced,
//! after persisting [`Machine::pickle`].
//!
//! What it guarantees:
//! - device keys are used only if their self-signature verifies, and a device
//!   whose keys change is refused; claimed one-time keys must be signed by
//!   the device they are claimed for;
//! - a room key is accepted only over Olm from the device it claims to come
//!   from, addressed to us, and bound to one conversation;
//! - a conversation message is decrypted only with a room key that came from
//!   exactly the message's sender, and its plaintext must name the same
//!   conversation and sender as the envelope the server delivered;
//! - malformed input of any kind yields a [`CryptoError`], never a panic.
//!
//! Olm uses [`olm::SessionConfig::version_1`] (the stable, libolm-compatible configuration Matrix uses), Megolm
//! [`megolm::SessionConfig::version_1`], everywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use chappe_proto::ids::{ConversationId, DeviceId, IdError, KeyId, MessageId, UserId};
use chappe_proto::signing;
use chappe_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use vodozemac::megolm::{
    self, GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
    MegolmMessage, SessionKey,
};
use vodozemac::olm::{self, Account, AccountPickle, OlmMessage, Session, SessionPickle};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{CryptoError, Error};
use crate::media::Attachment;

fn olm_config() -> olm::SessionConfig {
    olm::SessionConfig::version_1()
}

fn megolm_config() -> megolm::SessionConfig {
    megolm::SessionConfig::version_1()
}

/// The `type` of the Olm payload that carries a room key.
const ROOM_KEY_TYPE: &str = "chappe.room_key.v1";
/// The `type` of a text message's content.
const TEXT_CONTENT_TYPE: &str = "text";
/// The `type` of a file message's content: `{"type": "chappe.file", "file":
/// {…}}`, described in [`crate::media`].
const FILE_CONTENT_TYPE: &str = crate::media::FILE_CONTENT_TYPE;

// ------------------------------------------------------------------ types

/// One device of one user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceAddr {
    pub user_id: UserId,
    pub device_id: DeviceId,
}

impl DeviceAddr {
    pub fn new(user_id: UserId, device_id: DeviceId) -> Self {
        Self { user_id, device_id }
    }

    /// Validates both parts.
    pub fn parse(user_id: &str, device_id: &str) -> Result<Self, IdError> {
        Ok(Self {
            user_id: UserId::parse(user_id)?,
            device_id: DeviceId::parse(device_id)?,
        })
    }

    pub(crate) fn from_proto(r: Option<&pb::DeviceRef>) -> Result<Self, Error> {
        let r = r.ok_or_else(|| Error::protocol("missing device reference"))?;
        Ok(Self::parse(&r.user_id, &r.device_id)?)
    }

    pub(crate) fn to_proto(&self) -> pb::DeviceRef {
        pb::DeviceRef {
            user_id: self.user_id.to_string(),
            device_id: self.device_id.to_string(),
        }
    }
}

impl fmt::Display for DeviceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user_id, self.device_id)
    }
}

/// When an outbound Megolm session is replaced by a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Messages encrypted with one session before it is replaced (default 100).
    pub max_messages: u32,
    /// Age after which a session is replaced (default 7 days).
    pub max_age: Duration,
    /// Replace the session when a member (or one of the devices it was
    /// shared with) left, so that it cannot read what follows (default true).
    pub rotate_on_member_leave: bool,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_messages: 100,
            max_age: Duration::from_secs(7 * 24 * 3600),
            rotate_on_member_leave: true,
        }
    }
}

/// Bounds of the machine's in-memory (and persisted) state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoLimits {
    pub rotation: RotationPolicy,
    /// Olm sessions kept per remote device; the least recently used go first
    /// (default 4).
    pub max_olm_sessions_per_device: usize,
    /// Conversation messages kept while waiting for their room key (default
    /// 1000); beyond that, new ones are reported undecryptable and not kept.
    pub max_pending_messages: usize,
}

impl Default for CryptoLimits {
    fn default() -> Self {
        Self {
            rotation: RotationPolicy::default(),
            max_olm_sessions_per_device: 4,
            max_pending_messages: 1000,
        }
    }
}

/// A device whose keys verified: its self-signature holds and, if we saw it
/// before, its keys did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDevice {
    pub addr: DeviceAddr,
    pub curve25519: Curve25519PublicKey,
    pub ed25519: Ed25519PublicKey,
    pub created_at_ms: i64,
}

impl VerifiedDevice {
    fn same_keys(&self, other: &VerifiedDevice) -> bool {
        self.addr == other.addr
            && self.curve25519 == other.curve25519
            && self.ed25519 == other.ed25519
    }
}

/// The result of [`Machine::observe_devices`].
#[derive(Debug, Default)]
pub struct DeviceList {
    /// Usable devices, ours included.
    pub devices: Vec<VerifiedDevice>,
    /// Devices that were refused, and why.
    pub rejected: Vec<CryptoError>,
}

/// A conversation message as delivered by the server, ids validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub sender: DeviceAddr,
    pub session_id: String,
    pub ciphertext: Vec<u8>,
    pub sent_at_ms: i64,
}

impl TryFrom<&pb::Message> for IncomingMessage {
    type Error = Error;

    fn try_from(m: &pb::Message) -> Result<Self, Error> {
        Ok(Self {
            conversation_id: ConversationId::parse(&m.conversation_id)?,
            message_id: MessageId::parse(&m.message_id)?,
            sender: DeviceAddr::from_proto(m.sender.as_ref())?,
            session_id: m.session_id.clone(),
            ciphertext: m.ciphertext.clone(),
            sent_at_ms: m.sent_at_ms,
        })
    }
}

/// A conversation message, decrypted and authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptedMessage {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub sender_user: UserId,
    pub sender_device: DeviceId,
    /// The text; for a file, its name.
    pub body: String,
    /// The file this message carries, if it is a file message.
    pub attachment: Option<Attachment>,
    /// When the server stored it (server clock).
    pub sent_at_ms: i64,
    /// When the sender says it wrote it (sender's clock; informative only).
    pub claimed_sent_at_ms: i64,
}

/// A Megolm ciphertext ready to be sent in a `SendMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub conversation_id: ConversationId,
    pub session_id: String,
    pub ciphertext: Vec<u8>,
}

/// Why a new outbound session was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationReason {
    /// The conversation had no outbound session yet.
    NoSession,
    /// The session reached [`RotationPolicy::max_messages`].
    MessageLimit,
    /// The session reached [`RotationPolicy::max_age`].
    Expired,
    /// A member, or a device it was shared with, is gone.
    MemberLeft,
}

/// Olm messages carrying the current room key, for one `SendToDevice`.
#[derive(Debug, Default)]
pub struct RoomKeyBatch {
    pub session_id: String,
    pub messages: Vec<pb::ToDeviceMessage>,
    /// The devices the messages are for; pass to [`Machine::mark_shared`]
    /// once the server stored the batch.
    pub recipients: Vec<VerifiedDevice>,
    /// Devices that could not be given the key (no Olm session).
    pub skipped: Vec<CryptoError>,
}

/// What an accepted room key unlocked.
#[derive(Debug)]
pub struct RoomKeyReceived {
    pub conversation_id: ConversationId,
    pub session_id: String,
    pub from: DeviceAddr,
    /// Pending messages of that session, now decrypted (or refused).
    pub released: Vec<Released>,
}

/// A pending message, after its room key arrived.
#[derive(Debug)]
pub enum Released {
    Decrypted(DecryptedMessage),
    Refused(IncomingMessage, CryptoError),
}

/// What we know about our outbound session in one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    pub session_id: String,
    pub created_at_ms: i64,
    /// Messages encrypted with it so far.
    pub message_count: u32,
    /// Devices that were given the key, with the Curve25519 key it went to.
    pub shared_with: BTreeMap<DeviceAddr, Curve25519PublicKey>,
    /// The conversation's members when the session was created.
    pub members_at_creation: BTreeSet<UserId>,
}

// --------------------------------------------------------------- payloads

/// Olm plaintext carrying a room key. Binds both ends and the conversation.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomKeyPayload {
    #[serde(rename = "type")]
    kind: String,
    sender_user: String,
    sender_device: String,
    sender_ed25519: String,
    recipient_user: String,
    recipient_device: String,
    recipient_ed25519: String,
    conversation_id: String,
    session_id: String,
    session_key: String,
}

impl Drop for RoomKeyPayload {
    fn drop(&mut self) {
        self.session_key.zeroize();
    }
}

/// Megolm plaintext of a conversation message.
#[derive(Serialize, Deserialize)]
struct MessagePayload {
    conversation_id: String,
    sender_user: String,
    sender_device: String,
    sent_at_ms: i64,
    content: serde_json::Value,
}

// ---------------------------------------------------------------- machine

struct OlmEntry {
    session: Session,
    created_at_ms: i64,
    last_used_ms: i64,
}

struct Outbound {
    session: GroupSession,
    record: OutboundRecord,
}

struct Inbound {
    session: InboundGroupSession,
    conversation_id: ConversationId,
    /// The device the room key came from, over Olm.
    origin: VerifiedDevice,
    /// Megolm index → the message id it was seen under (replay detection).
    seen: BTreeMap<u32, MessageId>,
}

/// One device's end-to-end crypto state. See the module documentation.
pub struct Machine {
    me: DeviceAddr,
    account: Account,
    created_at_ms: i64,
    device_keys_published: bool,
    /// Creation time signed into the current batch of unpublished keys, so
    /// that a retried upload sends byte-identical keys.
    unpublished_created_at_ms: Option<i64>,
    limits: CryptoLimits,
    devices: BTreeMap<DeviceAddr, VerifiedDevice>,
    olm: HashMap<Curve25519PublicKey, Vec<OlmEntry>>,
    outbound: HashMap<ConversationId, Outbound>,
    inbound: HashMap<String, Inbound>,
    pending: BTreeMap<String, Vec<IncomingMessage>>,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("me", &self.me)
            .field("curve25519", &self.account.curve25519_key())
            .field(
                "olm_sessions",
                &self.olm.values().map(Vec::len).sum::<usize>(),
            )
            .field("outbound", &self.outbound.len())
            .field("inbound", &self.inbound.len())
            .finish_non_exhaustive()
    }
}

fn curve_from_b64(s: &str) -> Result<Curve25519PublicKey, String> {
    Curve25519PublicKey::from_base64(s).map_err(|e| e.to_string())
}

fn ed_from_b64(s: &str) -> Result<Ed25519PublicKey, String> {
    Ed25519PublicKey::from_base64(s).map_err(|e| e.to_string())
}

impl Machine {
    /// A new device with fresh identity keys and a fallback key.
    pub fn new(me: DeviceAddr, now_ms: i64, limits: CryptoLimits) -> Self {
        let mut account = Account::new();
        account.generate_fallback_key();
        let mut machine = Self {
            me,
            account,
            created_at_ms: now_ms,
            device_keys_published: false,
            unpublished_created_at_ms: None,
            limits,
            devices: BTreeMap::new(),
            olm: HashMap::new(),
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            pending: BTreeMap::new(),
        };
        let own = machine.own_device();
        machine.devices.insert(own.addr.clone(), own);
        machine
    }

    pub fn me(&self) -> &DeviceAddr {
        &self.me
    }

    pub fn set_limits(&mut self, limits: CryptoLimits) {
        self.limits = limits;
    }

    /// This device, as others see it.
    pub fn own_device(&self) -> VerifiedDevice {
        let keys = self.account.identity_keys();
        VerifiedDevice {
            addr: self.me.clone(),
            curve25519: keys.curve25519,
            ed25519: keys.ed25519,
            created_at_ms: self.created_at_ms,
        }
    }

    // ------------------------------------------------------------ own keys

    /// Our identity keys, self-signed over `signing::device_keys_bytes`.
    pub fn device_keys(&self) -> pb::DeviceKeys {
        let keys = self.account.identity_keys();
        let curve25519 = keys.curve25519.to_base64();
        let ed25519 = keys.ed25519.to_base64();
        let bytes = signing::device_keys_bytes(
            self.me.user_id.as_str(),
            self.me.device_id.as_str(),
            &curve25519,
            &ed25519,
            self.created_at_ms,
        );
        pb::DeviceKeys {
            user_id: self.me.user_id.to_string(),
            device_id: self.me.device_id.to_string(),
            curve25519,
            ed25519,
            signature: self.account.sign(&bytes).to_base64(),
            created_at_ms: self.created_at_ms,
        }
    }

    fn sign_one_time_key(
        &self,
        key_id: &str,
        key: &Curve25519PublicKey,
        fallback: bool,
        created_at_ms: i64,
    ) -> pb::OneTimeKey {
        let curve25519 = key.to_base64();
        let bytes = signing::one_time_key_bytes(
            self.me.user_id.as_str(),
            self.me.device_id.as_str(),
            key_id,
            &curve25519,
            fallback,
            created_at_ms,
        );
        pb::OneTimeKey {
            key_id: key_id.to_owned(),
            curve25519,
            signature: self.account.sign(&bytes).to_base64(),
            fallback,
            created_at_ms,
        }
    }

    /// What to upload to keydir, if anything.
    ///
    /// `server_count` is the number of our one-time keys keydir still holds
    /// (`None` if unknown). When it is below half of `target`, new keys are
    /// generated to reach `target`. Keys not yet marked published are sent
    /// again, byte for byte. Returns `None` when there is nothing to send.
    pub fn upload_request(
        &mut self,
        server_count: Option<u32>,
        target: usize,
        now_ms: i64,
    ) -> Option<pb::UploadKeysRequest> {
        let unpublished = self.account.one_time_keys().len();
        if let Some(count) = server_count {
            let count = count as usize;
            if count.saturating_mul(2) < target && count + unpublished < target {
                self.account
                    .generate_one_time_keys(target - count - unpublished);
            }
        }
        let mut one_time: Vec<_> = self.account.one_time_keys().into_iter().collect();
        one_time.sort_by_key(|(id, _)| *id);
        let fallback = self.account.fallback_key().into_iter().next();
        if one_time.is_empty() && fallback.is_none() && self.device_keys_published {
            return None;
        }
        let created_at_ms = *self.unpublished_created_at_ms.get_or_insert(now_ms);
        let one_time_keys = one_time
            .iter()
            .map(|(id, key)| self.sign_one_time_key(&id.to_base64(), key, false, created_at_ms))
            .collect();
        let fallback_key = fallback
            .map(|(id, key)| self.sign_one_time_key(&id.to_base64(), &key, true, created_at_ms));
        Some(pb::UploadKeysRequest {
            device_keys: Some(self.device_keys()),
            one_time_keys,
            fallback_key,
        })
    }

    /// Call once keydir accepted the last [`Machine::upload_request`].
    pub fn mark_published(&mut self) {
        self.account.mark_keys_as_published();
        self.device_keys_published = true;
        self.unpublished_created_at_ms = None;
    }

    pub fn device_keys_published(&self) -> bool {
        self.device_keys_published
    }

    // ------------------------------------------------------- other devices

    /// Checks a device's self-signature. Does not consult what we knew.
    pub fn verify_device_keys(keys: &pb::DeviceKeys) -> Result<VerifiedDevice, CryptoError> {
        let name = format!("{}/{}", keys.user_id, keys.device_id);
        let bad = |why: String| CryptoError::BadDeviceKeys {
            device: name.clone(),
            why,
        };
        let addr =
            DeviceAddr::parse(&keys.user_id, &keys.device_id).map_err(|e| bad(e.to_string()))?;
        let curve25519 = curve_from_b64(&keys.curve25519).map_err(&bad)?;
        let ed25519 = ed_from_b64(&keys.ed25519).map_err(&bad)?;
        let signature =
            Ed25519Signature::from_base64(&keys.signature).map_err(|e| bad(e.to_string()))?;
        let bytes = signing::device_keys_bytes(
            &keys.user_id,
            &keys.device_id,
            &keys.curve25519,
            &keys.ed25519,
            keys.created_at_ms,
        );
        ed25519
            .verify(&bytes, &signature)
            .map_err(|_| bad("self-signature does not verify".into()))?;
        Ok(VerifiedDevice {
            addr,
            curve25519,
            ed25519,
            created_at_ms: keys.created_at_ms,
        })
    }

    /// Takes a `QueryDevices` answer for `requested` users: verifies every
    /// device, refuses devices of users we did not ask for and devices whose
    /// keys differ from those we saw first, and remembers the new ones.
    pub fn observe_devices(
        &mut self,
        requested: &BTreeSet<UserId>,
        keys: &[pb::DeviceKeys],
    ) -> DeviceList {
        let mut list = DeviceList::default();
        let mut seen = BTreeSet::new();
        for k in keys {
            let device = match Self::verify_device_keys(k) {
                Ok(d) => d,
                Err(e) => {
                    list.rejected.push(e);
                    continue;
                }
            };
            if !requested.contains(&device.addr.user_id) {
                list.rejected.push(CryptoError::BadDeviceKeys {
                    device: device.addr.to_string(),
                    why: "user was not asked for".into(),
                });
                continue;
            }
            if !seen.insert(device.addr.clone()) {
                continue;
            }
            match self.devices.get(&device.addr) {
                Some(known) if !known.same_keys(&device) => {
                    list.rejected.push(CryptoError::DeviceKeysChanged {
                        device: device.addr.to_string(),
                    });
                    continue;
                }
                Some(known) => list.devices.push(known.clone()),
                None => {
                    self.devices.insert(device.addr.clone(), device.clone());
                    list.devices.push(device);
                }
            }
        }
        list
    }

    /// A device whose keys we verified before.
    pub fn known_device(&self, addr: &DeviceAddr) -> Option<&VerifiedDevice> {
        self.devices.get(addr)
    }

    // ------------------------------------------------------------------ Olm

    pub fn has_olm_session(&self, device: &VerifiedDevice) -> bool {
        self.olm
            .get(&device.curve25519)
            .is_some_and(|entries| !entries.is_empty())
    }

    /// Of `devices`, those (not us) without an Olm session.
    pub fn devices_without_olm(&self, devices: &[VerifiedDevice]) -> Vec<VerifiedDevice> {
        devices
            .iter()
            .filter(|d| d.addr != self.me && !self.has_olm_session(d))
            .cloned()
            .collect()
    }

    /// Opens an Olm session to `device` from a key claimed for it, after
    /// checking the key is the device's and signed by it.
    pub fn create_outbound_olm(
        &mut self,
        device: &VerifiedDevice,
        claimed: &pb::ClaimedKey,
        now_ms: i64,
    ) -> Result<(), CryptoError> {
        let bad = |why: &str| CryptoError::BadOneTimeKey {
            device: device.addr.to_string(),
            why: why.to_owned(),
        };
        if claimed.user_id != device.addr.user_id.as_str()
            || claimed.device_id != device.addr.device_id.as_str()
        {
            return Err(bad("claimed for another device"));
        }
        let key = claimed.key.as_ref().ok_or_else(|| bad("missing key"))?;
        KeyId::parse(key.key_id.as_str()).map_err(|_| bad("malformed key id"))?;
        let curve = curve_from_b64(&key.curve25519).map_err(|e| bad(&e))?;
        let signature = Ed25519Signature::from_base64(&key.signature)
            .map_err(|_| bad("malformed signature"))?;
        let bytes = signing::one_time_key_bytes(
            device.addr.user_id.as_str(),
            device.addr.device_id.as_str(),
            &key.key_id,
            &key.curve25519,
            key.fallback,
            key.created_at_ms,
        );
        device
            .ed25519
            .verify(&bytes, &signature)
            .map_err(|_| bad("signature does not verify"))?;
        let session = self
            .account
            .create_outbound_session(olm_config(), device.curve25519, curve)
            .map_err(|e| CryptoError::Olm(e.to_string()))?;
        self.add_olm_session(device.curve25519, session, now_ms);
        Ok(())
    }

    fn add_olm_session(&mut self, curve: Curve25519PublicKey, session: Session, now_ms: i64) {
        let max = self.limits.max_olm_sessions_per_device.max(1);
        let entries = self.olm.entry(curve).or_default();
        entries.push(OlmEntry {
            session,
            created_at_ms: now_ms,
            last_used_ms: now_ms,
        });
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used_ms));
        entries.truncate(max);
    }

    fn olm_encrypt(
        &mut self,
        device: &VerifiedDevice,
        plaintext: &[u8],
        now_ms: i64,
    ) -> Result<pb::ToDeviceMessage, CryptoError> {
        let no_session = || CryptoError::NoOlmSession {
            device: device.addr.to_string(),
        };
        let entry = self
            .olm
            .get_mut(&device.curve25519)
            .and_then(|entries| entries.iter_mut().max_by_key(|e| e.last_used_ms))
            .ok_or_else(no_session)?;
        let message = entry
            .session
            .encrypt(plaintext)
            .map_err(|e| CryptoError::Olm(e.to_string()))?;
        entry.last_used_ms = now_ms;
        let (olm_type, ciphertext) = message.to_parts();
        Ok(pb::ToDeviceMessage {
            recipient: Some(device.addr.to_proto()),
            olm_type: olm_type as u32,
            ciphertext,
        })
    }

    /// Decrypts an Olm message from `sender`, using only sessions with the
    /// sender's published Curve25519 key.
    fn olm_decrypt(
        &mut self,
        sender: &VerifiedDevice,
        olm_type: u32,
        ciphertext: &[u8],
        now_ms: i64,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let message = OlmMessage::from_parts(olm_type as usize, ciphertext)
            .map_err(|e| CryptoError::Olm(e.to_string()))?;
        let entries = self.olm.entry(sender.curve25519).or_default();
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used_ms));
        match &message {
            OlmMessage::PreKey(pre) => {
                if pre.identity_key() != sender.curve25519 {
                    return Err(CryptoError::IdentityKeyMismatch {
                        device: sender.addr.to_string(),
                    });
                }
                let session_id = pre.session_id();
                if let Some(entry) = entries
                    .iter_mut()
                    .find(|e| e.session.session_id() == session_id)
                {
                    let plaintext = entry
                        .session
                        .decrypt(&message)
                        .map_err(|e| CryptoError::Olm(e.to_string()))?;
                    entry.last_used_ms = now_ms;
                    return Ok(Zeroizing::new(plaintext));
                }
                let created = self
                    .account
                    .create_inbound_session(olm_config(), sender.curve25519, pre)
                    .map_err(|e| CryptoError::Olm(e.to_string()))?;
                self.add_olm_session(sender.curve25519, created.session, now_ms);
                Ok(Zeroizing::new(created.plaintext))
            }
            OlmMessage::Normal(_) => {
                for entry in entries.iter_mut() {
                    if let Ok(plaintext) = entry.session.decrypt(&message) {
                        entry.last_used_ms = now_ms;
                        return Ok(Zeroizing::new(plaintext));
                    }
                }
                Err(CryptoError::Olm(format!(
                    "no Olm session with {} decrypts this message",
                    sender.addr
                )))
            }
        }
    }

    // --------------------------------------------------------- Megolm, out

    /// Whether the outbound session of `conv` must be replaced. Membership
    /// is checked only when `members` and `devices` are given.
    pub fn rotation_due(
        &self,
        conv: &ConversationId,
        members: Option<&BTreeSet<UserId>>,
        devices: Option<&[VerifiedDevice]>,
        now_ms: i64,
    ) -> Option<RotationReason> {
        let Some(out) = self.outbound.get(conv) else {
            return Some(RotationReason::NoSession);
        };
        let policy = &self.limits.rotation;
        let record = &out.record;
        if record.message_count >= policy.max_messages {
            return Some(RotationReason::MessageLimit);
        }
        let max_age_ms = i64::try_from(policy.max_age.as_millis()).unwrap_or(i64::MAX);
        if now_ms.saturating_sub(record.created_at_ms) >= max_age_ms {
            return Some(RotationReason::Expired);
        }
        if policy.rotate_on_member_leave {
            if let Some(members) = members
                && !record.members_at_creation.is_subset(members)
            {
                return Some(RotationReason::MemberLeft);
            }
            if let Some(devices) = devices {
                let current: BTreeMap<&DeviceAddr, &Curve25519PublicKey> =
                    devices.iter().map(|d| (&d.addr, &d.curve25519)).collect();
                let gone = record
                    .shared_with
                    .iter()
                    .any(|(addr, curve)| current.get(addr) != Some(&curve));
                if gone {
                    return Some(RotationReason::MemberLeft);
                }
            }
        }
        None
    }

    /// Makes sure `conv` has a usable outbound session for these members and
    /// devices, starting a new one if [`Machine::rotation_due`] says so.
    /// Returns why it started one, if it did.
    pub fn ensure_outbound(
        &mut self,
        conv: &ConversationId,
        members: &BTreeSet<UserId>,
        devices: &[VerifiedDevice],
        now_ms: i64,
    ) -> Option<RotationReason> {
        let reason = self.rotation_due(conv, Some(members), Some(devices), now_ms)?;
        let session = GroupSession::new(megolm_config());
        let session_id = session.session_id();
        // Keep an inbound copy so that this device reads its own messages.
        let inbound = InboundGroupSession::new(&session.session_key(), megolm_config());
        self.inbound.insert(
            session_id.clone(),
            Inbound {
                session: inbound,
                conversation_id: *conv,
                origin: self.own_device(),
                seen: BTreeMap::new(),
            },
        );
        self.outbound.insert(
            *conv,
            Outbound {
                session,
                record: OutboundRecord {
                    session_id,
                    created_at_ms: now_ms,
                    message_count: 0,
                    shared_with: BTreeMap::new(),
                    members_at_creation: members.clone(),
                },
            },
        );
        Some(reason)
    }

    pub fn outbound_record(&self, conv: &ConversationId) -> Option<&OutboundRecord> {
        self.outbound.get(conv).map(|o| &o.record)
    }

    /// Of `devices`, those (not us) that do not hold the current room key of
    /// `conv`.
    pub fn devices_needing_key(
        &self,
        conv: &ConversationId,
        devices: &[VerifiedDevice],
    ) -> Vec<VerifiedDevice> {
        let shared = self.outbound.get(conv).map(|o| &o.record.shared_with);
        devices
            .iter()
            .filter(|d| d.addr != self.me)
            .filter(|d| shared.and_then(|s| s.get(&d.addr)) != Some(&d.curve25519))
            .cloned()
            .collect()
    }

    /// Encrypts the current room key of `conv` over Olm for each device.
    /// Devices without an Olm session are skipped (listed in `skipped`).
    pub fn encrypt_room_keys(
        &mut self,
        conv: &ConversationId,
        devices: &[VerifiedDevice],
        now_ms: i64,
    ) -> Result<RoomKeyBatch, CryptoError> {
        let out = self
            .outbound
            .get(conv)
            .ok_or_else(|| CryptoError::NoOutboundSession {
                conversation: conv.to_string(),
            })?;
        let session_id = out.record.session_id.clone();
        let session_key = Zeroizing::new(out.session.session_key().to_base64());
        let own_ed = self.account.ed25519_key().to_base64();
        let mut batch = RoomKeyBatch {
            session_id: session_id.clone(),
            ..RoomKeyBatch::default()
        };
        let me = self.me.clone();
        for device in devices.iter().filter(|d| d.addr != me) {
            let payload = RoomKeyPayload {
                kind: ROOM_KEY_TYPE.to_owned(),
                sender_user: self.me.user_id.to_string(),
                sender_device: self.me.device_id.to_string(),
                sender_ed25519: own_ed.clone(),
                recipient_user: device.addr.user_id.to_string(),
                recipient_device: device.addr.device_id.to_string(),
                recipient_ed25519: device.ed25519.to_base64(),
                conversation_id: conv.to_string(),
                session_id: session_id.clone(),
                session_key: session_key.to_string(),
            };
            let plaintext = Zeroizing::new(
                serde_json::to_vec(&payload)
                    .map_err(|e| CryptoError::MalformedPayload(e.to_string()))?,
            );
            match self.olm_encrypt(device, &plaintext, now_ms) {
                Ok(message) => {
                    batch.messages.push(message);
                    batch.recipients.push(device.clone());
                }
                Err(e) => batch.skipped.push(e),
            }
        }
        Ok(batch)
    }

    /// Records that `recipients` now hold room key `session_id` of `conv`.
    pub fn mark_shared(
        &mut self,
        conv: &ConversationId,
        session_id: &str,
        recipients: &[VerifiedDevice],
    ) {
        if let Some(out) = self.outbound.get_mut(conv)
            && out.record.session_id == session_id
        {
            for d in recipients {
                out.record.shared_with.insert(d.addr.clone(), d.curve25519);
            }
        }
    }

    /// Encrypts a text message with the outbound session of `conv`.
    ///
    /// Persist the machine before the ciphertext leaves the device: the
    /// Megolm ratchet advanced.
    pub fn encrypt_text(
        &mut self,
        conv: &ConversationId,
        text: &str,
        now_ms: i64,
    ) -> Result<OutgoingMessage, CryptoError> {
        let content = serde_json::json!({ "type": TEXT_CONTENT_TYPE, "text": text });
        self.encrypt_content(conv, content, now_ms)
    }

    /// Encrypts a file message (its content carries the file's key) with the
    /// outbound session of `conv`. Persist before it leaves, as for text.
    pub fn encrypt_file(
        &mut self,
        conv: &ConversationId,
        attachment: &Attachment,
        now_ms: i64,
    ) -> Result<OutgoingMessage, CryptoError> {
        let content = attachment
            .to_content()
            .map_err(|e| CryptoError::MalformedPayload(e.to_string()))?;
        self.encrypt_content(conv, content, now_ms)
    }

    fn encrypt_content(
        &mut self,
        conv: &ConversationId,
        content: serde_json::Value,
        now_ms: i64,
    ) -> Result<OutgoingMessage, CryptoError> {
        let me = self.me.clone();
        let out = self
            .outbound
            .get_mut(conv)
            .ok_or_else(|| CryptoError::NoOutboundSession {
                conversation: conv.to_string(),
            })?;
        let payload = MessagePayload {
            conversation_id: conv.to_string(),
            sender_user: me.user_id.to_string(),
            sender_device: me.device_id.to_string(),
            sent_at_ms: now_ms,
            content,
        };
        let plaintext = Zeroizing::new(
            serde_json::to_vec(&payload)
                .map_err(|e| CryptoError::MalformedPayload(e.to_string()))?,
        );
        let message = out.session.encrypt(&*plaintext);
        out.record.message_count = out.record.message_count.saturating_add(1);
        Ok(OutgoingMessage {
            conversation_id: *conv,
            session_id: out.record.session_id.clone(),
            ciphertext: message.to_bytes(),
        })
    }

    // ---------------------------------------------------------- Megolm, in

    /// Takes a to-device event: `event_sender` is who the server says sent
    /// it (from the sender's authenticated session), `sender` that device's
    /// keys as published by keydir and verified.
    pub fn receive_to_device(
        &mut self,
        event_sender: &DeviceAddr,
        sender: &VerifiedDevice,
        olm_type: u32,
        ciphertext: &[u8],
        now_ms: i64,
    ) -> Result<RoomKeyReceived, CryptoError> {
        if &sender.addr != event_sender {
            return Err(CryptoError::ForgedSender {
                claimed: sender.addr.to_string(),
                actual: event_sender.to_string(),
            });
        }
        if let Some(known) = self.devices.get(&sender.addr)
            && !known.same_keys(sender)
        {
            return Err(CryptoError::DeviceKeysChanged {
                device: sender.addr.to_string(),
            });
        }
        let plaintext = self.olm_decrypt(sender, olm_type, ciphertext, now_ms)?;
        let payload: RoomKeyPayload = serde_json::from_slice(&plaintext)
            .map_err(|e| CryptoError::MalformedPayload(format!("room key: {e}")))?;
        if payload.kind != ROOM_KEY_TYPE {
            return Err(CryptoError::UnsupportedContent(format!(
                "to-device payload of type {:?}",
                payload.kind
            )));
        }
        let own_ed = self.account.ed25519_key().to_base64();
        if payload.recipient_user != self.me.user_id.as_str()
            || payload.recipient_device != self.me.device_id.as_str()
            || payload.recipient_ed25519 != own_ed
        {
            return Err(CryptoError::NotForUs {
                addressed: format!("{}/{}", payload.recipient_user, payload.recipient_device),
            });
        }
        if payload.sender_user != event_sender.user_id.as_str()
            || payload.sender_device != event_sender.device_id.as_str()
            || payload.sender_ed25519 != sender.ed25519.to_base64()
        {
            return Err(CryptoError::ForgedSender {
                claimed: format!("{}/{}", payload.sender_user, payload.sender_device),
                actual: event_sender.to_string(),
            });
        }
        let conversation_id = ConversationId::parse(&payload.conversation_id)
            .map_err(|e| CryptoError::MalformedPayload(e.to_string()))?;
        let key = SessionKey::from_base64(&payload.session_key)
            .map_err(|e| CryptoError::MalformedPayload(format!("session key: {e}")))?;
        let session = InboundGroupSession::new(&key, megolm_config());
        let session_id = session.session_id();
        if session_id != payload.session_id {
            return Err(CryptoError::MalformedPayload(
                "session id does not match the session key".into(),
            ));
        }
        match self.inbound.get_mut(&session_id) {
            Some(existing) => {
                if !existing.origin.same_keys(sender) || existing.conversation_id != conversation_id
                {
                    return Err(CryptoError::RoomKeyConflict { session_id });
                }
                if session.first_known_index() < existing.session.first_known_index() {
                    existing.session = session;
                }
            }
            None => {
                self.inbound.insert(
                    session_id.clone(),
                    Inbound {
                        session,
                        conversation_id,
                        origin: sender.clone(),
                        seen: BTreeMap::new(),
                    },
                );
            }
        }
        let released = self
            .pending
            .remove(&session_id)
            .unwrap_or_default()
            .into_iter()
            .map(|m| match self.decrypt_message(&m) {
                Ok(d) => Released::Decrypted(d),
                Err(e) => Released::Refused(m, e),
            })
            .collect();
        Ok(RoomKeyReceived {
            conversation_id,
            session_id,
            from: sender.addr.clone(),
            released,
        })
    }

    /// Decrypts a conversation message. See the module documentation for
    /// what is checked.
    pub fn decrypt_message(
        &mut self,
        msg: &IncomingMessage,
    ) -> Result<DecryptedMessage, CryptoError> {
        let inbound =
            self.inbound
                .get_mut(&msg.session_id)
                .ok_or_else(|| CryptoError::MissingRoomKey {
                    session_id: msg.session_id.clone(),
                })?;
        if inbound.origin.addr != msg.sender {
            return Err(CryptoError::SenderMismatch {
                envelope: msg.sender.to_string(),
                origin: inbound.origin.addr.to_string(),
            });
        }
        if inbound.conversation_id != msg.conversation_id {
            return Err(CryptoError::ConversationMismatch {
                envelope: msg.conversation_id.to_string(),
                bound: inbound.conversation_id.to_string(),
            });
        }
        let megolm = MegolmMessage::from_bytes(&msg.ciphertext)
            .map_err(|e| CryptoError::Megolm(e.to_string()))?;
        let decrypted = inbound.session.decrypt(&megolm).map_err(|e| match e {
            megolm::DecryptionError::UnknownMessageIndex(first_known, index) => {
                CryptoError::UnknownMessageIndex { index, first_known }
            }
            other => CryptoError::Megolm(other.to_string()),
        })?;
        let index = decrypted.message_index;
        let plaintext = Zeroizing::new(decrypted.plaintext);
        if let Some(seen_as) = inbound.seen.get(&index)
            && *seen_as != msg.message_id
        {
            return Err(CryptoError::Replayed {
                session_id: msg.session_id.clone(),
                index,
            });
        }
        let payload: MessagePayload = serde_json::from_slice(&plaintext)
            .map_err(|e| CryptoError::MalformedPayload(format!("message: {e}")))?;
        if payload.conversation_id != msg.conversation_id.to_string() {
            return Err(CryptoError::ConversationMismatch {
                envelope: msg.conversation_id.to_string(),
                bound: payload.conversation_id,
            });
        }
        if payload.sender_user != msg.sender.user_id.as_str()
            || payload.sender_device != msg.sender.device_id.as_str()
        {
            return Err(CryptoError::SenderMismatch {
                envelope: msg.sender.to_string(),
                origin: format!("{}/{}", payload.sender_user, payload.sender_device),
            });
        }
        let kind = payload.content.get("type").and_then(|t| t.as_str());
        let (body, attachment) = match kind {
            Some(TEXT_CONTENT_TYPE) => {
                let text = payload
                    .content
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        CryptoError::MalformedPayload("text message without text".into())
                    })?;
                (text.to_owned(), None)
            }
            Some(FILE_CONTENT_TYPE) => {
                let attachment = Attachment::from_content(&payload.content)
                    .map_err(|e| CryptoError::MalformedPayload(format!("file message: {e}")))?;
                (attachment.name.clone(), Some(attachment))
            }
            _ => {
                return Err(CryptoError::UnsupportedContent(format!(
                    "message content of type {kind:?}"
                )));
            }
        };
        inbound.seen.insert(index, msg.message_id);
        Ok(DecryptedMessage {
            conversation_id: msg.conversation_id,
            message_id: msg.message_id,
            sender_user: msg.sender.user_id.clone(),
            sender_device: msg.sender.device_id.clone(),
            body,
            attachment,
            sent_at_ms: msg.sent_at_ms,
            claimed_sent_at_ms: payload.sent_at_ms,
        })
    }

    /// Keeps a message whose room key has not arrived, to decrypt it when it
    /// does. Returns false (and drops it) when the pending store is full.
    pub fn queue_pending(&mut self, msg: IncomingMessage) -> bool {
        let total = self.pending_count();
        let queued = self
            .pending
            .get(&msg.session_id)
            .is_some_and(|q| q.iter().any(|m| m.message_id == msg.message_id));
        if queued {
            return true;
        }
        if total >= self.limits.max_pending_messages {
            return false;
        }
        self.pending
            .entry(msg.session_id.clone())
            .or_default()
            .push(msg);
        true
    }

    pub fn pending_count(&self) -> usize {
        self.pending.values().map(Vec::len).sum()
    }

    /// The device an inbound session's room key came from.
    pub fn inbound_origin(&self, session_id: &str) -> Option<&VerifiedDevice> {
        self.inbound.get(session_id).map(|i| &i.origin)
    }

    // ------------------------------------------------------------- pickles

    /// Everything, serializable. Contains secrets: encrypt before storing.
    pub fn pickle(&self) -> MachinePickle {
        let device = |d: &VerifiedDevice| DevicePickle {
            user_id: d.addr.user_id.to_string(),
            device_id: d.addr.device_id.to_string(),
            curve25519: d.curve25519.to_base64(),
            ed25519: d.ed25519.to_base64(),
            created_at_ms: d.created_at_ms,
        };
        MachinePickle {
            user_id: self.me.user_id.to_string(),
            device_id: self.me.device_id.to_string(),
            created_at_ms: self.created_at_ms,
            account: self.account.pickle(),
            device_keys_published: self.device_keys_published,
            unpublished_created_at_ms: self.unpublished_created_at_ms,
            devices: self.devices.values().map(device).collect(),
            olm_sessions: self
                .olm
                .iter()
                .flat_map(|(curve, entries)| {
                    entries.iter().map(move |e| OlmPickle {
                        curve25519: curve.to_base64(),
                        session: e.session.pickle(),
                        created_at_ms: e.created_at_ms,
                        last_used_ms: e.last_used_ms,
                    })
                })
                .collect(),
            outbound: self
                .outbound
                .iter()
                .map(|(conv, o)| OutboundPickle {
                    conversation_id: conv.to_string(),
                    session: o.session.pickle(),
                    created_at_ms: o.record.created_at_ms,
                    message_count: o.record.message_count,
                    shared_with: o
                        .record
                        .shared_with
                        .iter()
                        .map(|(addr, curve)| SharedPickle {
                            user_id: addr.user_id.to_string(),
                            device_id: addr.device_id.to_string(),
                            curve25519: curve.to_base64(),
                        })
                        .collect(),
                    members_at_creation: o
                        .record
                        .members_at_creation
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                })
                .collect(),
            inbound: self
                .inbound
                .values()
                .map(|i| InboundPickle {
                    session: i.session.pickle(),
                    conversation_id: i.conversation_id.to_string(),
                    origin: device(&i.origin),
                    seen: i
                        .seen
                        .iter()
                        .map(|(index, id)| (*index, id.to_string()))
                        .collect(),
                })
                .collect(),
            pending: self
                .pending
                .values()
                .flatten()
                .map(|m| PendingPickle {
                    conversation_id: m.conversation_id.to_string(),
                    message_id: m.message_id.to_string(),
                    sender_user: m.sender.user_id.to_string(),
                    sender_device: m.sender.device_id.to_string(),
                    session_id: m.session_id.clone(),
                    ciphertext: m.ciphertext.clone(),
                    sent_at_ms: m.sent_at_ms,
                })
                .collect(),
        }
    }

    /// Restores a machine from [`Machine::pickle`].
    pub fn from_pickle(p: MachinePickle, limits: CryptoLimits) -> Result<Self, Error> {
        let corrupt = |what: &str, e: String| Error::CorruptState(format!("{what}: {e}"));
        let device = |d: DevicePickle| -> Result<VerifiedDevice, Error> {
            Ok(VerifiedDevice {
                addr: DeviceAddr::parse(&d.user_id, &d.device_id)?,
                curve25519: curve_from_b64(&d.curve25519).map_err(|e| corrupt("device", e))?,
                ed25519: ed_from_b64(&d.ed25519).map_err(|e| corrupt("device", e))?,
                created_at_ms: d.created_at_ms,
            })
        };
        let me = DeviceAddr::parse(&p.user_id, &p.device_id)?;
        let mut machine = Machine {
            me,
            account: Account::from_pickle(p.account),
            created_at_ms: p.created_at_ms,
            device_keys_published: p.device_keys_published,
            unpublished_created_at_ms: p.unpublished_created_at_ms,
            limits,
            devices: BTreeMap::new(),
            olm: HashMap::new(),
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            pending: BTreeMap::new(),
        };
        for d in p.devices {
            let d = device(d)?;
            machine.devices.insert(d.addr.clone(), d);
        }
        for o in p.olm_sessions {
            let curve = curve_from_b64(&o.curve25519).map_err(|e| corrupt("olm session", e))?;
            machine.olm.entry(curve).or_default().push(OlmEntry {
                session: Session::from_pickle(o.session),
                created_at_ms: o.created_at_ms,
                last_used_ms: o.last_used_ms,
            });
        }
        for o in p.outbound {
            let conv = ConversationId::parse(&o.conversation_id)?;
            let session = GroupSession::from_pickle(o.session);
            let mut shared_with = BTreeMap::new();
            for s in o.shared_with {
                shared_with.insert(
                    DeviceAddr::parse(&s.user_id, &s.device_id)?,
                    curve_from_b64(&s.curve25519).map_err(|e| corrupt("outbound", e))?,
                );
            }
            let members_at_creation = o
                .members_at_creation
                .iter()
                .map(|u| UserId::parse(u.as_str()))
                .collect::<Result<_, _>>()?;
            machine.outbound.insert(
                conv,
                Outbound {
                    record: OutboundRecord {
                        session_id: session.session_id(),
                        created_at_ms: o.created_at_ms,
                        message_count: o.message_count,
                        shared_with,
                        members_at_creation,
                    },
                    session,
                },
            );
        }
        for i in p.inbound {
            let session = InboundGroupSession::from_pickle(i.session);
            let mut seen = BTreeMap::new();
            for (index, id) in i.seen {
                seen.insert(index, MessageId::parse(&id)?);
            }
            machine.inbound.insert(
                session.session_id(),
                Inbound {
                    session,
                    conversation_id: ConversationId::parse(&i.conversation_id)?,
                    origin: device(i.origin)?,
                    seen,
                },
            );
        }
        for m in p.pending {
            let msg = IncomingMessage {
                conversation_id: ConversationId::parse(&m.conversation_id)?,
                message_id: MessageId::parse(&m.message_id)?,
                sender: DeviceAddr::parse(&m.sender_user, &m.sender_device)?,
                session_id: m.session_id,
                ciphertext: m.ciphertext,
                sent_at_ms: m.sent_at_ms,
            };
            machine
                .pending
                .entry(msg.session_id.clone())
                .or_default()
                .push(msg);
        }
        Ok(machine)
    }
}

/// The serialized form of a [`Machine`]. Holds private keys.
#[derive(Serialize, Deserialize)]
pub struct MachinePickle {
    user_id: String,
    device_id: String,
    created_at_ms: i64,
    account: AccountPickle,
    device_keys_published: bool,
    unpublished_created_at_ms: Option<i64>,
    devices: Vec<DevicePickle>,
    olm_sessions: Vec<OlmPickle>,
    outbound: Vec<OutboundPickle>,
    inbound: Vec<InboundPickle>,
    pending: Vec<PendingPickle>,
}

#[derive(Serialize, Deserialize)]
struct DevicePickle {
    user_id: String,
    device_id: String,
    curve25519: String,
    ed25519: String,
    created_at_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct OlmPickle {
    curve25519: String,
    session: SessionPickle,
    created_at_ms: i64,
    last_used_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct SharedPickle {
    user_id: String,
    device_id: String,
    curve25519: String,
}

#[derive(Serialize, Deserialize)]
struct OutboundPickle {
    conversation_id: String,
    session: GroupSessionPickle,
    created_at_ms: i64,
    message_count: u32,
    shared_with: Vec<SharedPickle>,
    members_at_creation: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct InboundPickle {
    session: InboundGroupSessionPickle,
    conversation_id: String,
    origin: DevicePickle,
    seen: Vec<(u32, String)>,
}

#[derive(Serialize, Deserialize)]
struct PendingPickle {
    conversation_id: String,
    message_id: String,
    sender_user: String,
    sender_device: String,
    session_id: String,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
    sent_at_ms: i64,
}

/// Bytes as unpadded standard base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD_NO_PAD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD_NO_PAD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
