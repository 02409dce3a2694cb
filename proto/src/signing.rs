//! The exact bytes a device signs, so that the client SDK signs and keydir
//! verifies the same thing.
//!
//! Each starts with a domain tag and joins its fields with `\n`, which none
//! of the fields may contain: ids are validated ([`crate::ids`]) and keys are
//! base64.

/// What a device's Ed25519 key signs to vouch for its identity keys.
pub fn device_keys_bytes(
    user_id: &str,
    device_id: &str,
    curve25519: &str,
    ed25519: &str,
    created_at_ms: i64,
) -> Vec<u8> {
    format!(
        "chappe.v1.device_keys\n{user_id}\n{device_id}\n{curve25519}\n{ed25519}\n{created_at_ms}"
    )
    .into_bytes()
}

/// What a device's Ed25519 key signs to vouch for a one-time or fallback key.
pub fn one_time_key_bytes(
    user_id: &str,
    device_id: &str,
    key_id: &str,
    curve25519: &str,
    fallback: bool,
    created_at_ms: i64,
) -> Vec<u8> {
    let kind = if fallback { "fallback" } else { "one_time" };
    format!("chappe.v1.{kind}_key\n{user_id}\n{device_id}\n{key_id}\n{curve25519}\n{created_at_ms}")
        .into_bytes()
}
