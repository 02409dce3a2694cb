//! Subject names (DESIGN.md §3), all under one configurable prefix.

use chappe_proto::ids::UserId;

/// The default prefix.
pub const DEFAULT_PREFIX: &str = "chappe";

/// Queue groups, one per service.
pub const FANOUT_GROUP: &str = "fanout";
pub const KEYDIR_GROUP: &str = "keydir";
pub const PRESENCE_GROUP: &str = "presence";
pub const MEDIA_GROUP: &str = "media";
/// The consumer group of delivery workers.
pub const DELIVERY_GROUP: &str = "fanout-delivery";

/// Builds subject names from the prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

/// Request/reply methods served by fanout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutMethod {
    CreateConversation,
    ListConversations,
    GetConversation,
    UpdateMembership,
    Submit,
    SubmitToDevice,
    AckToDevice,
    Sync,
    History,
    /// For presence: the users who share a conversation with a user.
    Contacts,
    /// For presence and media: which of some conversations a user is a
    /// member of, with their members.
    Memberships,
}

impl FanoutMethod {
    pub const ALL: [FanoutMethod; 11] = [
        Self::CreateConversation,
        Self::ListConversations,
        Self::GetConversation,
        Self::UpdateMembership,
        Self::Submit,
        Self::SubmitToDevice,
        Self::AckToDevice,
        Self::Sync,
        Self::History,
        Self::Contacts,
        Self::Memberships,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateConversation => "create_conversation",
            Self::ListConversations => "list_conversations",
            Self::GetConversation => "get_conversation",
            Self::UpdateMembership => "update_membership",
            Self::Submit => "submit",
            Self::SubmitToDevice => "submit_to_device",
            Self::AckToDevice => "ack_to_device",
            Self::Sync => "sync",
            Self::History => "history",
            Self::Contacts => "contacts",
            Self::Memberships => "memberships",
        }
    }
}

/// Request/reply methods served by keydir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeydirMethod {
    UploadKeys,
    QueryDevices,
    ClaimKeys,
}

impl KeydirMethod {
    pub const ALL: [KeydirMethod; 3] = [Self::UploadKeys, Self::QueryDevices, Self::ClaimKeys];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UploadKeys => "upload_keys",
            Self::QueryDevices => "query_devices",
            Self::ClaimKeys => "claim_keys",
        }
    }
}

/// Request/reply methods served by presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMethod {
    /// A device's connection, heartbeat or disconnection, from its gateway.
    Connection,
    /// A batch of users' presence.
    Query,
    /// A member is typing in a conversation: relayed, never stored.
    Typing,
    /// A user's presence settings (hide last-seen).
    Settings,
}

impl PresenceMethod {
    pub const ALL: [PresenceMethod; 4] =
        [Self::Connection, Self::Query, Self::Typing, Self::Settings];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Query => "query",
            Self::Typing => "typing",
            Self::Settings => "settings",
        }
    }
}

/// Request/reply methods served by media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaMethod {
    /// Opens or resumes an upload.
    Begin,
    /// Stores the next chunk of an upload.
    PutChunk,
    /// What is stored of an upload (its owner asks).
    Status,
    /// A complete object, for a member of a conversation it was posted in.
    Open,
    /// One chunk of a complete object, same access rule.
    GetChunk,
}

impl MediaMethod {
    pub const ALL: [MediaMethod; 5] = [
        Self::Begin,
        Self::PutChunk,
        Self::Status,
        Self::Open,
        Self::GetChunk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::PutChunk => "put_chunk",
            Self::Status => "status",
            Self::Open => "open",
            Self::GetChunk => "get_chunk",
        }
    }
}

impl Subjects {
    /// `prefix` must be one or more subject tokens without wildcards.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.rpc.fanout.<method>`
    pub fn fanout(&self, method: FanoutMethod) -> String {
        format!("{}.rpc.fanout.{}", self.prefix, method.as_str())
    }

    /// `<prefix>.rpc.keydir.<method>`
    pub fn keydir(&self, method: KeydirMethod) -> String {
        format!("{}.rpc.keydir.{}", self.prefix, method.as_str())
    }

    /// `<prefix>.rpc.presence.<method>`
    pub fn presence(&self, method: PresenceMethod) -> String {
        format!("{}.rpc.presence.{}", self.prefix, method.as_str())
    }

    /// `<prefix>.rpc.media.<method>`.
    pub fn media(&self, method: MediaMethod) -> String {
        format!("{}.rpc.media.{}", self.prefix, method.as_str())
    }

    /// `<prefix>.jobs.deliver`: the durable queue of delivery jobs.
    pub fn jobs_deliver(&self) -> String {
        format!("{}.jobs.deliver", self.prefix)
    }

    /// `<prefix>.deliver.u.<user>`: deliveries for the connected devices of a user.
    pub fn deliver_user(&self, user: &UserId) -> String {
        format!("{}.deliver.u.{}", self.prefix, user_token(user))
    }

    /// `<prefix>.evt.keys.*`: every user's device-list changes.
    pub fn evt_keys_all(&self) -> String {
        format!("{}.evt.keys.*", self.prefix)
    }

    /// `<prefix>.evt.keys.<user>`: a user's device list changed.
    pub fn evt_keys(&self, user: &UserId) -> String {
        format!("{}.evt.keys.{}", self.prefix, user_token(user))
    }
}

/// A user id as one subject token: `.` separates tokens, so it becomes `~`,
/// which user ids never contain (the mapping is one to one).
fn user_token(user: &UserId) -> String {
    user.as_str().replace('.', "~")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_one_token() {
        let s = Subjects::default();
        let user = UserId::parse("jean.dupont").unwrap();
        assert_eq!(s.deliver_user(&user), "chappe.deliver.u.jean~dupont");
        assert!(crate::subject_matches(
            "chappe.deliver.u.*",
            &s.deliver_user(&user)
        ));
        assert!(crate::subject_matches(
            &s.evt_keys_all(),
            &s.evt_keys(&user)
        ));
        assert_eq!(
            Subjects::new("x.y").fanout(FanoutMethod::Submit),
            "x.y.rpc.fanout.submit"
        );
        assert_eq!(
            s.presence(PresenceMethod::Query),
            "chappe.rpc.presence.query"
        );
    }
}
