//! Wire types in, domain types out: everything a request carries is
//! validated here, once, before a handler sees it.

use chappe_proto::ids::{ClientMsgId, ConversationId, DeviceId, MessageId, UserId};
use chappe_proto::v1;
use chappe_storage::{ConversationRow, InboxRow, MembershipRow, MessageRow};

use crate::error::{Error, Result};

/// The authenticated device a request acts for (set by the gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub user: UserId,
    pub device: DeviceId,
}

impl Actor {
    pub fn from_wire(actor: Option<v1::DeviceRef>) -> Result<Self> {
        let actor = actor.ok_or_else(|| Error::Invalid("request carries no actor".into()))?;
        Ok(Self {
            user: UserId::parse(actor.user_id)?,
            device: DeviceId::parse(actor.device_id)?,
        })
    }
}

/// The request body, or INVALID_ARGUMENT when absent.
pub fn body<T>(request: Option<T>) -> Result<T> {
    request.ok_or_else(|| Error::Invalid("request body is missing".into()))
}

pub fn user_id(s: &str) -> Result<UserId> {
    Ok(UserId::parse(s)?)
}

pub fn conversation_id(s: &str) -> Result<ConversationId> {
    Ok(ConversationId::parse(s)?)
}

/// An optional message id: empty means none.
pub fn optional_message_id(s: &str) -> Result<Option<MessageId>> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(MessageId::parse(s)?))
    }
}

/// A page size: 0 means `default`, anything else is capped at `max`.
pub fn limit(requested: u32, default: u32, max: u32) -> usize {
    match requested {
        0 => default,
        n => n.min(max),
    }
    .max(1) as usize
}

/// Longest Megolm session id accepted (vodozemac's are 43 characters).
const MAX_SESSION_ID_LEN: usize = 128;

/// A validated conversation message from its sender.
pub struct Submission {
    pub conversation: ConversationId,
    pub client_msg_id: ClientMsgId,
    pub ciphertext: Vec<u8>,
    pub session_id: String,
}

impl Submission {
    pub fn from_wire(send: v1::SendMessage, max_bytes: usize) -> Result<Self> {
        let ciphertext = send.ciphertext;
        if ciphertext.len() > max_bytes {
            return Err(Error::TooLarge {
                what: "message ciphertext",
                size: ciphertext.len(),
                limit: max_bytes,
            });
        }
        // Only Megolm messages travel in conversations: the server cannot
        // read them but checks their shape, so nothing else is relabelled
        // as one (DESIGN.md §5).
        vodozemac::megolm::MegolmMessage::from_bytes(&ciphertext)
            .map_err(|e| Error::Invalid(format!("ciphertext is not a Megolm message: {e}")))?;
        if send.session_id.is_empty() || send.session_id.len() > MAX_SESSION_ID_LEN {
            return Err(Error::Invalid(format!(
                "session_id must be 1 to {MAX_SESSION_ID_LEN} characters"
            )));
        }
        Ok(Self {
            conversation: conversation_id(&send.conversation_id)?,
            client_msg_id: ClientMsgId::parse(send.client_msg_id)?,
            ciphertext,
            session_id: send.session_id,
        })
    }
}

/// A validated Olm message for one device.
pub struct ToDevice {
    pub user: UserId,
    pub device: DeviceId,
    pub olm_type: u32,
    pub ciphertext: Vec<u8>,
}

impl ToDevice {
    pub fn from_wire(m: v1::ToDeviceMessage, max_bytes: usize) -> Result<Self> {
        let recipient = m
            .recipient
            .ok_or_else(|| Error::Invalid("to-device message without recipient".into()))?;
        if m.ciphertext.len() > max_bytes {
            return Err(Error::TooLarge {
                what: "to-device ciphertext",
                size: m.ciphertext.len(),
                limit: max_bytes,
            });
        }
        // Only Olm messages travel between devices.
        vodozemac::olm::OlmMessage::from_parts(m.olm_type as usize, &m.ciphertext)
            .map_err(|e| Error::Invalid(format!("ciphertext is not an Olm message: {e}")))?;
        Ok(Self {
            user: UserId::parse(recipient.user_id)?,
            device: DeviceId::parse(recipient.device_id)?,
            olm_type: m.olm_type,
            ciphertext: m.ciphertext,
        })
    }
}

pub fn device_ref(user: &str, device: &str) -> v1::DeviceRef {
    v1::DeviceRef {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
    }
}

pub fn message(row: MessageRow) -> v1::Message {
    v1::Message {
        conversation_id: row.conversation_id.to_string(),
        message_id: row.message_id.to_string(),
        sender: Some(device_ref(&row.sender_user_id, &row.sender_device_id)),
        client_msg_id: row.client_msg_id,
        ciphertext: row.ciphertext,
        session_id: row.session_id,
        sent_at_ms: row.sent_at_ms,
    }
}

pub fn to_device_event(row: InboxRow) -> v1::ToDeviceEvent {
    v1::ToDeviceEvent {
        inbox_id: row.inbox_id.to_string(),
        sender: Some(device_ref(&row.sender_user_id, &row.sender_device_id)),
        olm_type: row.olm_type,
        ciphertext: row.ciphertext,
        sent_at_ms: row.sent_at_ms,
    }
}

pub fn conversation(row: &ConversationRow, members: Vec<String>) -> v1::Conversation {
    v1::Conversation {
        conversation_id: row.conversation_id.to_string(),
        kind: row.kind,
        member_user_ids: members,
        created_at_ms: row.created_at_ms,
        head_message_id: row.head.map(|h| h.to_string()).unwrap_or_default(),
        membership_seq: row.membership_seq,
    }
}

pub fn membership_event(row: MembershipRow) -> v1::MembershipEvent {
    v1::MembershipEvent {
        seq: row.seq,
        actor: Some(device_ref(&row.actor_user_id, &row.actor_device_id)),
        op: row.op,
        target_user_id: row.target_user_id,
        at_ms: row.at_ms,
        signature: row.signature,
    }
}
