//! keydir's tables: device keys, one-time keys, fallback keys.

use async_trait::async_trait;

use super::{CqlStore, Inner, Lwt, backoff};
use crate::{
    ClaimedKey, DeviceKeysRow, Error, KeyRepo, OneTimeKeyRow, PutDevice, PutFallback, Result,
};

type DeviceTuple = (String, String, String, String, String, i64, i64);
type KeyTuple = (String, String, String, i64);
/// A one-time key row and who claimed it (`None`: still offered).
type ClaimableTuple = (String, String, String, i64, Option<i64>);

fn device(t: DeviceTuple) -> DeviceKeysRow {
    DeviceKeysRow {
        user_id: t.0,
        device_id: t.1,
        curve25519: t.2,
        ed25519: t.3,
        signature: t.4,
        created_at_ms: t.5,
        uploaded_at_ms: t.6,
    }
}

fn key(t: KeyTuple) -> OneTimeKeyRow {
    OneTimeKeyRow {
        key_id: t.0,
        curve25519: t.1,
        signature: t.2,
        created_at_ms: t.3,
    }
}

fn claimable(t: ClaimableTuple) -> (OneTimeKeyRow, Option<i64>) {
    (key((t.0, t.1, t.2, t.3)), t.4)
}

/// Rows read per claim round to pick a key from: claimers racing on one
/// device pick among several, so that most rounds do not collide.
const CLAIM_CANDIDATES: i32 = 16;

impl Inner {
    async fn device_serial(&self, user: &str, device_id: &str) -> Result<Option<DeviceKeysRow>> {
        let row: Option<DeviceTuple> = self
            .first("device_keys", &self.st.device_get_serial, (user, device_id))
            .await?;
        Ok(row.map(device))
    }

    async fn fallback(
        &self,
        user: &str,
        device_id: &str,
        serial: bool,
    ) -> Result<Option<OneTimeKeyRow>> {
        let st = if serial {
            &self.st.fallback_get_serial
        } else {
            &self.st.fallback_get
        };
        let row: Option<KeyTuple> = self.first("fallback_keys", st, (user, device_id)).await?;
        Ok(row.map(key))
    }

    async fn key_rows(
        &self,
        user: &str,
        device_id: &str,
        serial: bool,
    ) -> Result<Vec<(OneTimeKeyRow, Option<i64>)>> {
        let st = if serial {
            &self.st.otk_list_serial
        } else {
            &self.st.otk_list
        };
        let rows: Vec<ClaimableTuple> = self.all("one_time_keys", st, (user, device_id)).await?;
        Ok(rows.into_iter().map(claimable).collect())
    }

    /// Deletes a claimed row (by LWT, so it orders with the claims);
    /// true when it was deleted (or is gone).
    async fn delete_claimed(&self, user: &str, device_id: &str, key_id: &str, by: i64) -> bool {
        match self
            .lwt(
                "one_time_keys",
                &self.st.otk_delete_claimed,
                (user, device_id, key_id, by),
            )
            .await
        {
            Ok(Lwt::Applied | Lwt::NotApplied) => true,
            Ok(Lwt::Unknown(e)) | Err(e) => {
                tracing::warn!(
                    error = %e, user, device = device_id, key_id,
                    "claimed one-time key not deleted; it stays claimed (never offered again)"
                );
                false
            }
        }
    }

    /// One round of a claim: `Some(result)` when settled, `None` to try
    /// again (the key picked was taken by another claimer).
    async fn claim_round(&self, user: &str, device_id: &str) -> Result<Option<Option<ClaimedKey>>> {
        let rows: Vec<ClaimableTuple> = self
            .all(
                "one_time_keys",
                &self.st.otk_first,
                (user, device_id, CLAIM_CANDIDATES),
            )
            .await?;
        let offered: Vec<OneTimeKeyRow> = rows
            .into_iter()
            .map(claimable)
            .filter(|(_, claimed)| claimed.is_none())
            .map(|(k, _)| k)
            .collect();
        let candidate = if offered.is_empty() {
            // The first rows may all be claimed ones awaiting deletion:
            // look at the whole partition before giving the fallback.
            let all = self.key_rows(user, device_id, false).await?;
            all.into_iter()
                .find(|(_, claimed)| claimed.is_none())
                .map(|(k, _)| k)
        } else {
            let i = rand::random_range(0..offered.len());
            offered.into_iter().nth(i)
        };
        let Some(candidate) = candidate else {
            let fallback = self.fallback(user, device_id, false).await?;
            return Ok(Some(fallback.map(|key| ClaimedKey {
                key,
                fallback: true,
            })));
        };
        let attempt = Self::attempt_id();
        let outcome = self
            .lwt(
                "one_time_keys",
                &self.st.otk_claim,
                (
                    attempt,
                    user,
                    device_id,
                    candidate.key_id.as_str(),
                    candidate.curve25519.as_str(),
                    candidate.signature.as_str(),
                    candidate.created_at_ms,
                ),
            )
            .await?;
        let won = match outcome {
            Lwt::Applied => true,
            Lwt::NotApplied => false,
            Lwt::Unknown(e) => {
                // Whose is it now? The serial read settles any Paxos round
                // left in progress.
                tracing::debug!(error = %e, "one-time key claim outcome unknown; reading back");
                let row: Option<ClaimableTuple> = self
                    .first(
                        "one_time_keys",
                        &self.st.otk_get_serial,
                        (user, device_id, candidate.key_id.as_str()),
                    )
                    .await?;
                row.is_some_and(|r| r.4 == Some(attempt))
            }
        };
        if !won {
            return Ok(None);
        }
        self.delete_claimed(user, device_id, &candidate.key_id, attempt)
            .await;
        Ok(Some(Some(ClaimedKey {
            key: candidate,
            fallback: false,
        })))
    }
}

#[async_trait]
impl KeyRepo for CqlStore {
    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceKeysRow>> {
        let row: Option<DeviceTuple> = self
            .inner
            .first(
                "device_keys",
                &self.inner.st.device_get,
                (user_id, device_id),
            )
            .await?;
        Ok(row.map(device))
    }

    /// A device whose stored Curve25519 and Ed25519 keys equal the row's is
    /// `Unchanged` (its first signature and times are kept).
    async fn put_device(&self, row: &DeviceKeysRow) -> Result<PutDevice> {
        let inner = &self.inner;
        let outcome = inner
            .lwt(
                "device_keys",
                &inner.st.device_insert,
                (
                    row.user_id.as_str(),
                    row.device_id.as_str(),
                    row.curve25519.as_str(),
                    row.ed25519.as_str(),
                    row.signature.as_str(),
                    row.created_at_ms,
                    row.uploaded_at_ms,
                ),
            )
            .await?;
        if let Lwt::Applied = outcome {
            return Ok(PutDevice::Inserted);
        }
        let stored = inner.device_serial(&row.user_id, &row.device_id).await?;
        match (outcome, stored) {
            (Lwt::Unknown(e), None) => Err(e),
            (_, None) => Err(Error::Unavailable(format!(
                "device_keys: {}/{} was neither inserted nor found",
                row.user_id, row.device_id
            ))),
            (Lwt::Unknown(_), Some(stored)) if stored == *row => Ok(PutDevice::Inserted),
            (_, Some(stored)) => {
                let same = stored.curve25519 == row.curve25519 && stored.ed25519 == row.ed25519;
                Ok(if same {
                    PutDevice::Unchanged
                } else {
                    PutDevice::Conflict(stored)
                })
            }
        }
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceKeysRow>> {
        let rows: Vec<DeviceTuple> = self
            .inner
            .all("device_keys", &self.inner.st.device_list, (user_id,))
            .await?;
        Ok(rows.into_iter().map(device).collect())
    }

    /// The keys missing from the device go in one conditional batch (one
    /// partition: all or none); a batch that lost a race is worked out
    /// again from what is stored.
    async fn add_one_time_keys(
        &self,
        user_id: &str,
        device_id: &str,
        keys: &[OneTimeKeyRow],
    ) -> Result<u64> {
        let inner = &self.inner;
        for round in 0..inner.config.lwt_attempts {
            let serial = round > 0;
            let stored = inner.key_rows(user_id, device_id, serial).await?;
            let mut missing: Vec<&OneTimeKeyRow> = Vec::new();
            let mut stale_claims = Vec::new();
            for key in keys {
                match stored.iter().find(|(k, _)| k.key_id == key.key_id) {
                    None => missing.push(key),
                    Some((_, Some(by))) => {
                        // Claimed but its row not deleted: gone, as far as
                        // callers can tell. Finish deleting it, then add.
                        stale_claims.push((key.key_id.clone(), *by));
                        missing.push(key);
                    }
                    Some((k, None))
                        if k.curve25519 == key.curve25519 && k.signature == key.signature => {}
                    Some(_) => {
                        return Err(Error::Conflict(format!(
                            "one-time key {} of {user_id}/{device_id} is stored with another key \
                             or signature",
                            key.key_id
                        )));
                    }
                }
            }
            for (key_id, by) in &stale_claims {
                if !inner.delete_claimed(user_id, device_id, key_id, *by).await {
                    return Err(Error::Unavailable(format!(
                        "one_time_keys: claimed key {key_id} of {user_id}/{device_id} could not \
                         be deleted"
                    )));
                }
            }
            let mut seen = std::collections::HashSet::new();
            missing.retain(|k| seen.insert(k.key_id.as_str()));
            if missing.is_empty() {
                return self.count_one_time_keys(user_id, device_id).await;
            }
            let batch = inner.batch_of(&inner.st.otk_insert, missing.len());
            let values: Vec<_> = missing
                .iter()
                .map(|k| {
                    (
                        user_id,
                        device_id,
                        k.key_id.as_str(),
                        k.curve25519.as_str(),
                        k.signature.as_str(),
                        k.created_at_ms,
                    )
                })
                .collect();
            match inner.lwt_batch("one_time_keys", &batch, values).await? {
                Lwt::Applied => return self.count_one_time_keys(user_id, device_id).await,
                // Lost a race, or unknown: what is stored now decides (the
                // next round reads with SERIAL).
                Lwt::NotApplied | Lwt::Unknown(_) => backoff(round).await,
            }
        }
        Err(Error::Unavailable(format!(
            "one_time_keys: upload for {user_id}/{device_id} kept racing with other writers"
        )))
    }

    async fn count_one_time_keys(&self, user_id: &str, device_id: &str) -> Result<u64> {
        let rows = self.inner.key_rows(user_id, device_id, false).await?;
        Ok(rows.iter().filter(|(_, claimed)| claimed.is_none()).count() as u64)
    }

    async fn put_fallback_key(
        &self,
        user_id: &str,
        device_id: &str,
        key: &OneTimeKeyRow,
    ) -> Result<PutFallback> {
        let inner = &self.inner;
        for round in 0..inner.config.lwt_attempts {
            let stored = inner.fallback(user_id, device_id, round > 0).await?;
            let outcome = match &stored {
                Some(stored) if stored == key => return Ok(PutFallback::Unchanged),
                Some(stored) if stored.created_at_ms > key.created_at_ms => {
                    return Ok(PutFallback::Stale);
                }
                None => {
                    inner
                        .lwt(
                            "fallback_keys",
                            &inner.st.fallback_insert,
                            (
                                user_id,
                                device_id,
                                key.key_id.as_str(),
                                key.curve25519.as_str(),
                                key.signature.as_str(),
                                key.created_at_ms,
                            ),
                        )
                        .await?
                }
                Some(stored) => {
                    inner
                        .lwt(
                            "fallback_keys",
                            &inner.st.fallback_replace,
                            (
                                key.key_id.as_str(),
                                key.curve25519.as_str(),
                                key.signature.as_str(),
                                key.created_at_ms,
                                user_id,
                                device_id,
                                stored.key_id.as_str(),
                                stored.curve25519.as_str(),
                                stored.signature.as_str(),
                                stored.created_at_ms,
                            ),
                        )
                        .await?
                }
            };
            match outcome {
                Lwt::Applied => return Ok(PutFallback::Stored),
                Lwt::Unknown(_) => {
                    if inner.fallback(user_id, device_id, true).await?.as_ref() == Some(key) {
                        return Ok(PutFallback::Stored);
                    }
                }
                Lwt::NotApplied => {}
            }
            backoff(round).await;
        }
        Err(Error::Unavailable(format!(
            "fallback_keys: {user_id}/{device_id} kept racing with other writers"
        )))
    }

    /// Hands out a random one of the device's first few unclaimed keys.
    async fn claim_key(&self, user_id: &str, device_id: &str) -> Result<Option<ClaimedKey>> {
        let inner = &self.inner;
        for round in 0..inner.config.lwt_attempts {
            if let Some(settled) = inner.claim_round(user_id, device_id).await? {
                return Ok(settled);
            }
            backoff(round).await;
        }
        Err(Error::Unavailable(format!(
            "one_time_keys: claims on {user_id}/{device_id} kept colliding"
        )))
    }
}
