//! Identifiers, validated once where they enter the system.
//!
//! A value of these types is well formed by construction, so code past the
//! edge never re-checks it. The rules are deliberately narrow: ids end up in
//! bus subjects (`chappe.deliver.u.<user>`), store keys and signed bytes, so
//! they may contain neither `.`-free wildcards nor separators.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long, the limit is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} {value:?} contains {bad:?}; allowed: {allowed}")]
    BadChar {
        kind: &'static str,
        value: String,
        bad: char,
        allowed: &'static str,
    },
    #[error("{kind} {value:?} is malformed: {why}")]
    Malformed {
        kind: &'static str,
        value: String,
        why: &'static str,
    },
}

fn check(
    kind: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max,
        });
    }
    if let Some(bad) = value.chars().find(|c| !ok(*c)) {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            bad,
            allowed,
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $allowed:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($kind, &value, $max, $allowed, $ok)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A civil servant's account: `[a-z0-9._-]{1,64}`.
    UserId,
    "user id",
    64,
    "a-z 0-9 . _ -",
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
);

string_id!(
    /// One device of a user: `[A-Za-z0-9_-]{1,32}`.
    ///
    /// At most 32 characters, so a device id can never be mistaken for a
    /// Curve25519 or Ed25519 key (43 characters of base64).
    DeviceId,
    "device id",
    32,
    "A-Z a-z 0-9 _ -",
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
);

string_id!(
    /// A key's id within its device: `[A-Za-z0-9_+/=-]{1,64}`.
    KeyId,
    "key id",
    64,
    "A-Z a-z 0-9 _ + / = -",
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '/' | '=' | '-')
);

string_id!(
    /// A client's id for one send, unique per sending device: `[A-Za-z0-9_-]{1,64}`.
    ClientMsgId,
    "client_msg_id",
    64,
    "A-Z a-z 0-9 _ -",
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
);

/// A conversation: `c` followed by 32 lowercase hex digits, made by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConversationId(u128);

impl ConversationId {
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }

    pub fn parse(value: &str) -> Result<Self, IdError> {
        let malformed = |why| IdError::Malformed {
            kind: "conversation id",
            value: value.to_owned(),
            why,
        };
        let hex = value
            .strip_prefix('c')
            .ok_or_else(|| malformed("must start with 'c'"))?;
        Ok(Self(parse_hex32(hex).ok_or_else(|| {
            malformed("must be 'c' and 32 lowercase hex digits")
        })?))
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{:032x}", self.0)
    }
}

impl FromStr for ConversationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

fn parse_hex32(hex: &str) -> Option<u128> {
    if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
}

/// A time-ordered server id for messages and inbox entries.
///
/// 128 bits: milliseconds since the Unix epoch (48), a counter within the
/// millisecond (16), and a random per-generator node id (64). Printed as 32
/// lowercase hex digits, so the textual order is the numeric order is the
/// order in which one generator made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u128);

impl MessageId {
    /// The smallest id of a millisecond: every id made at or after `ms` is
    /// greater or equal.
    pub fn floor(ms: u64) -> Self {
        Self(u128::from(ms & 0xffff_ffff_ffff) << 80)
    }

    pub fn from_u128(v: u128) -> Self {
        Self(v)
    }

    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// When the id was made, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }

    pub fn parse(value: &str) -> Result<Self, IdError> {
        parse_hex32(value)
            .map(Self)
            .ok_or_else(|| IdError::Malformed {
                kind: "message id",
                value: value.to_owned(),
                why: "must be 32 lowercase hex digits",
            })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock (0 if the
/// clock is before 1970).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Makes strictly increasing [`MessageId`]s, even when the clock steps back.
#[derive(Debug)]
pub struct MessageIdGenerator {
    node: u64,
    last: Mutex<(u64, u16)>,
}

impl Default for MessageIdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl MessageIdGenerator {
    pub fn new() -> Self {
        Self {
            node: rand::random(),
            last: Mutex::new((0, 0)),
        }
    }

    pub fn next(&self) -> MessageId {
        self.next_at(unix_ms().max(0) as u64)
    }

    /// The next id for a clock reading of `now_ms` (exposed for tests).
    pub fn next_at(&self, now_ms: u64) -> MessageId {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (ms, counter) = if now_ms > last.0 {
            (now_ms, 0)
        } else if last.1 == u16::MAX {
            // Counter exhausted within the millisecond: borrow the next one.
            (last.0 + 1, 0)
        } else {
            (last.0, last.1 + 1)
        };
        *last = (ms, counter);
        MessageId(
            (u128::from(ms & 0xffff_ffff_ffff) << 80)
                | (u128::from(counter) << 64)
                | u128::from(self.node),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_device_ids_are_narrow() {
        assert!(UserId::parse("alice.martin-2").is_ok());
        assert!(matches!(UserId::parse(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            UserId::parse("Alice"),
            Err(IdError::BadChar { .. })
        ));
        assert!(matches!(UserId::parse("a>b"), Err(IdError::BadChar { .. })));
        assert!(matches!(UserId::parse("a*"), Err(IdError::BadChar { .. })));
        assert!(DeviceId::parse("LAPTOP_1").is_ok());
        // A Curve25519 key in base64 is 43 characters: too long for a device id.
        let key = "3Ptt4zObE8x3Rj2l2vtcB3PR8TS3sURoNCnQXiBIAQw";
        assert!(matches!(DeviceId::parse(key), Err(IdError::TooLong { .. })));
        assert!(DeviceId::parse("a.b").is_err());
    }

    #[test]
    fn conversation_ids_round_trip() {
        let id = ConversationId::random();
        assert_eq!(ConversationId::parse(&id.to_string()), Ok(id));
        assert!(ConversationId::parse("c123").is_err());
        assert!(ConversationId::parse(&format!("x{:032x}", 5)).is_err());
        assert!(ConversationId::parse(&format!("c{:032X}", u128::MAX)).is_err());
    }

    #[test]
    fn message_ids_increase_even_when_the_clock_steps_back() {
        let g = MessageIdGenerator::new();
        let a = g.next_at(1_000);
        let b = g.next_at(1_000);
        let c = g.next_at(999);
        let d = g.next_at(1_001);
        assert!(a < b && b < c && c < d);
        assert_eq!(a.timestamp_ms(), 1_000);
        assert_eq!(MessageId::parse(&d.to_string()), Ok(d));
        assert!(a.to_string() < d.to_string());
        assert!(MessageId::floor(1_000) <= a && a < MessageId::floor(1_001));
    }

    #[test]
    fn counter_overflow_borrows_the_next_millisecond() {
        let g = MessageIdGenerator::new();
        let mut prev = g.next_at(5);
        for _ in 0..70_000 {
            let next = g.next_at(5);
            assert!(next > prev);
            prev = next;
        }
        assert_eq!(prev.timestamp_ms(), 6);
    }
}
