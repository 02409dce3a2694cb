//! Wire types to domain types, validated as they convert, and stored rows
//! back to wire types.
//!
//! A value of a domain type is well formed: its ids passed
//! [`chappe_proto::ids`], its keys and signatures decode as vodozemac keys
//! printed in canonical unpadded base64, and a [`DeviceKeys`] carries a
//! self-signature that verifies.

use std::collections::HashSet;
use std::fmt;

use chappe_proto::ids::{DeviceId, KeyId, UserId};
use chappe_proto::internal;
use chappe_proto::signing;
use chappe_proto::v1;
use chappe_storage::{ClaimedKey, DeviceKeysRow, OneTimeKeyRow};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::error::{Error, Result};

/// One device of one user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceRef {
    pub user_id: UserId,
    pub device_id: DeviceId,
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user_id, self.device_id)
    }
}

impl TryFrom<v1::DeviceRef> for DeviceRef {
    type Error = Error;

    fn try_from(d: v1::DeviceRef) -> Result<Self> {
        Ok(Self {
            user_id: UserId::parse(d.user_id).map_err(|e| Error::invalid("user_id", e))?,
            device_id: DeviceId::parse(d.device_id).map_err(|e| Error::invalid("device_id", e))?,
        })
    }
}

impl From<&DeviceRef> for v1::DeviceRef {
    fn from(d: &DeviceRef) -> Self {
        Self {
            user_id: d.user_id.to_string(),
            device_id: d.device_id.to_string(),
        }
    }
}

/// A device's identity keys whose self-signature verifies.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    pub device: DeviceRef,
    pub curve25519: Curve25519PublicKey,
    pub ed25519: Ed25519PublicKey,
    pub signature: Ed25519Signature,
    pub created_at_ms: i64,
}

impl TryFrom<v1::DeviceKeys> for DeviceKeys {
    type Error = Error;

    fn try_from(k: v1::DeviceKeys) -> Result<Self> {
        let device = DeviceRef::try_from(v1::DeviceRef {
            user_id: k.user_id,
            device_id: k.device_id,
        })?;
        let curve25519 = curve25519_key("curve25519", &k.curve25519)?;
        let ed25519 = ed25519_key("ed25519", &k.ed25519)?;
        let signature = signature("signature", &k.signature)?;
        check_timestamp("created_at_ms", k.created_at_ms)?;
        let bytes = signing::device_keys_bytes(
            device.user_id.as_str(),
            device.device_id.as_str(),
            &k.curve25519,
            &k.ed25519,
            k.created_at_ms,
        );
        ed25519
            .verify(&bytes, &signature)
            .map_err(|_| Error::BadSignature {
                what: "device keys".into(),
            })?;
        Ok(Self {
            device,
            curve25519,
            ed25519,
            signature,
            created_at_ms: k.created_at_ms,
        })
    }
}

impl DeviceKeys {
    /// The row to store, stamped with the upload time.
    pub fn to_row(&self, uploaded_at_ms: i64) -> DeviceKeysRow {
        DeviceKeysRow {
            user_id: self.device.user_id.to_string(),
            device_id: self.device.device_id.to_string(),
            curve25519: self.curve25519.to_base64(),
            ed25519: self.ed25519.to_base64(),
            signature: self.signature.to_base64(),
            created_at_ms: self.created_at_ms,
            uploaded_at_ms,
        }
    }
}

/// A one-time or fallback key, well formed but not yet checked against its
/// device's signing key (see [`OneTimeKey::verify`]).
#[derive(Debug, Clone)]
pub struct OneTimeKey {
    pub key_id: KeyId,
    pub curve25519: Curve25519PublicKey,
    pub signature: Ed25519Signature,
    pub fallback: bool,
    pub created_at_ms: i64,
}

impl TryFrom<v1::OneTimeKey> for OneTimeKey {
    type Error = Error;

    fn try_from(k: v1::OneTimeKey) -> Result<Self> {
        Ok(Self {
            key_id: KeyId::parse(k.key_id).map_err(|e| Error::invalid("key_id", e))?,
            curve25519: curve25519_key("curve25519", &k.curve25519)?,
            signature: signature("signature", &k.signature)?,
            fallback: k.fallback,
            created_at_ms: check_timestamp("created_at_ms", k.created_at_ms)?,
        })
    }
}

impl OneTimeKey {
    /// Checks that `signing_key`, the Ed25519 key of `device`, signed this key.
    pub fn verify(&self, device: &DeviceRef, signing_key: &Ed25519PublicKey) -> bool {
        let bytes = signing::one_time_key_bytes(
            device.user_id.as_str(),
            device.device_id.as_str(),
            self.key_id.as_str(),
            &self.curve25519.to_base64(),
            self.fallback,
            self.created_at_ms,
        );
        signing_key.verify(&bytes, &self.signature).is_ok()
    }

    pub fn to_row(&self) -> OneTimeKeyRow {
        OneTimeKeyRow {
            key_id: self.key_id.to_string(),
            curve25519: self.curve25519.to_base64(),
            signature: self.signature.to_base64(),
            created_at_ms: self.created_at_ms,
        }
    }
}

/// An upload from an authenticated device.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The device that sends it, as the gateway authenticated it.
    pub actor: DeviceRef,
    pub device_keys: Option<DeviceKeys>,
    /// Each with `fallback == false`.
    pub one_time_keys: Vec<OneTimeKey>,
    /// With `fallback == true`.
    pub fallback_key: Option<OneTimeKey>,
}

impl TryFrom<internal::UploadKeys> for Upload {
    type Error = Error;

    fn try_from(u: internal::UploadKeys) -> Result<Self> {
        let actor = actor(u.actor)?;
        let request = u.request.ok_or_else(|| Error::Missing("request".into()))?;
        let device_keys = request
            .device_keys
            .map(|k| DeviceKeys::try_from(k).map_err(|e| e.within("device_keys")))
            .transpose()?;
        let one_time_keys = request
            .one_time_keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let path = format!("one_time_keys[{i}]");
                let key = OneTimeKey::try_from(k).map_err(|e| e.within(&path))?;
                if key.fallback {
                    return Err(Error::invalid(
                        format!("{path}.fallback"),
                        "must be false for a one-time key",
                    ));
                }
                Ok(key)
            })
            .collect::<Result<Vec<_>>>()?;
        let fallback_key = request
            .fallback_key
            .map(|k| {
                let key = OneTimeKey::try_from(k).map_err(|e| e.within("fallback_key"))?;
                if !key.fallback {
                    return Err(Error::invalid(
                        "fallback_key.fallback",
                        "must be true for a fallback key",
                    ));
                }
                Ok(key)
            })
            .transpose()?;
        Ok(Self {
            actor,
            device_keys,
            one_time_keys,
            fallback_key,
        })
    }
}

/// A device query: the users whose devices are wanted, without repeats.
#[derive(Debug, Clone)]
pub struct Query {
    pub actor: DeviceRef,
    pub user_ids: Vec<UserId>,
}

impl TryFrom<internal::QueryDevices> for Query {
    type Error = Error;

    fn try_from(q: internal::QueryDevices) -> Result<Self> {
        let actor = actor(q.actor)?;
        let request = q.request.ok_or_else(|| Error::Missing("request".into()))?;
        let mut seen = HashSet::new();
        let mut user_ids = Vec::new();
        for (i, user) in request.user_ids.into_iter().enumerate() {
            let user =
                UserId::parse(user).map_err(|e| Error::invalid(format!("user_ids[{i}]"), e))?;
            if seen.insert(user.clone()) {
                user_ids.push(user);
            }
        }
        Ok(Self { actor, user_ids })
    }
}

/// A claim: the devices whose one-time key is wanted, without repeats.
#[derive(Debug, Clone)]
pub struct Claim {
    pub actor: DeviceRef,
    pub devices: Vec<DeviceRef>,
}

impl TryFrom<internal::ClaimKeys> for Claim {
    type Error = Error;

    fn try_from(c: internal::ClaimKeys) -> Result<Self> {
        let actor = actor(c.actor)?;
        let request = c.request.ok_or_else(|| Error::Missing("request".into()))?;
        let mut seen = HashSet::new();
        let mut devices = Vec::new();
        for (i, device) in request.devices.into_iter().enumerate() {
            let device =
                DeviceRef::try_from(device).map_err(|e| e.within(&format!("devices[{i}]")))?;
            if seen.insert(device.clone()) {
                devices.push(device);
            }
        }
        Ok(Self { actor, devices })
    }
}

/// Stored device keys as the wire carries them.
pub fn device_keys_to_wire(row: DeviceKeysRow) -> v1::DeviceKeys {
    v1::DeviceKeys {
        user_id: row.user_id,
        device_id: row.device_id,
        curve25519: row.curve25519,
        ed25519: row.ed25519,
        signature: row.signature,
        created_at_ms: row.created_at_ms,
    }
}

/// A claimed key as the wire carries it.
pub fn claimed_key_to_wire(device: &DeviceRef, claimed: ClaimedKey) -> v1::ClaimedKey {
    v1::ClaimedKey {
        user_id: device.user_id.to_string(),
        device_id: device.device_id.to_string(),
        key: Some(v1::OneTimeKey {
            key_id: claimed.key.key_id,
            curve25519: claimed.key.curve25519,
            signature: claimed.key.signature,
            fallback: claimed.fallback,
            created_at_ms: claimed.key.created_at_ms,
        }),
    }
}

fn actor(actor: Option<v1::DeviceRef>) -> Result<DeviceRef> {
    let actor = actor.ok_or_else(|| Error::Missing("actor".into()))?;
    DeviceRef::try_from(actor).map_err(|e| e.within("actor"))
}

const CANONICAL: &str = "must be unpadded standard base64, as vodozemac prints it";

fn curve25519_key(field: &str, value: &str) -> Result<Curve25519PublicKey> {
    let key = Curve25519PublicKey::from_base64(value).map_err(|e| Error::invalid(field, e))?;
    if key.to_base64() != value {
        return Err(Error::invalid(field, CANONICAL));
    }
    Ok(key)
}

fn ed25519_key(field: &str, value: &str) -> Result<Ed25519PublicKey> {
    let key = Ed25519PublicKey::from_base64(value).map_err(|e| Error::invalid(field, e))?;
    if key.to_base64() != value {
        return Err(Error::invalid(field, CANONICAL));
    }
    Ok(key)
}

fn signature(field: &str, value: &str) -> Result<Ed25519Signature> {
    let sig = Ed25519Signature::from_base64(value).map_err(|e| Error::invalid(field, e))?;
    if sig.to_base64() != value {
        return Err(Error::invalid(field, CANONICAL));
    }
    Ok(sig)
}

fn check_timestamp(field: &str, ms: i64) -> Result<i64> {
    if ms < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    Ok(ms)
}
