//! keydir's request handlers and the routes that serve them on the bus.

use std::sync::Arc;

use bytes::Bytes;
use chappe_bus::rpc::Server;
use chappe_bus::subjects::{KEYDIR_GROUP, KeydirMethod};
use chappe_bus::{Bus, Headers, RpcError, Subjects};
use chappe_proto::internal;
use chappe_proto::v1;
use chappe_storage::{KeyRepo, PutDevice, PutFallback};
use futures::StreamExt;
use prost::Message as _;
use vodozemac::Ed25519PublicKey;

use crate::config::KeydirConfig;
use crate::convert::{self, Claim, DeviceRef, OneTimeKey, Query, Upload};
use crate::error::{Error, Result};

/// The handlers, sharing the store, the bus and the limits.
pub struct Service {
    config: KeydirConfig,
    store: Arc<dyn KeyRepo>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
}

/// An `rpc::Server` with one route per [`KeydirMethod`], in queue group
/// [`KEYDIR_GROUP`].
pub fn routes(service: Arc<Service>) -> Server {
    let upload = service.clone();
    let query = service.clone();
    let claim = service.clone();
    let subjects = &service.subjects;
    Server::new(
        service.bus.clone(),
        KEYDIR_GROUP,
        service.config.max_in_flight,
    )
    .route(subjects.keydir(KeydirMethod::UploadKeys), move |r| {
        let s = upload.clone();
        async move { reply(s.upload_keys(r).await) }
    })
    .route(subjects.keydir(KeydirMethod::QueryDevices), move |r| {
        let s = query.clone();
        async move { reply(s.query_devices(r).await) }
    })
    .route(subjects.keydir(KeydirMethod::ClaimKeys), move |r| {
        let s = claim.clone();
        async move { reply(s.claim_keys(r).await) }
    })
}

fn reply<T>(result: Result<T>) -> Result<T, RpcError> {
    result.map_err(|e| {
        if e.is_server_fault() {
            tracing::error!(error = %e, "keydir request failed");
        }
        RpcError::from(e)
    })
}

impl Service {
    pub fn new(
        config: KeydirConfig,
        store: Arc<dyn KeyRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Self {
        Self {
            config,
            store,
            bus,
            subjects,
        }
    }

    /// Stores a device's verified keys; see the crate documentation for the
    /// rules.
    #[tracing::instrument(skip_all, fields(user, device, one_time_keys, new_device))]
    pub async fn upload_keys(&self, req: internal::UploadKeys) -> Result<v1::UploadKeysResponse> {
        if let Some(r) = &req.request {
            check_count(
                "one_time_keys",
                r.one_time_keys.len(),
                self.config.max_one_time_keys_per_upload,
            )?;
        }
        let upload = Upload::try_from(req)?;
        let span = tracing::Span::current();
        span.record("user", upload.actor.user_id.as_str());
        span.record("device", upload.actor.device_id.as_str());
        span.record("one_time_keys", upload.one_time_keys.len());
        let device = &upload.actor;

        let now = chappe_proto::ids::unix_ms();
        self.check_not_future(now, &upload)?;

        // The signing key that must have signed the one-time keys: the one
        // uploaded now, or else the one stored.
        let signing_key = match &upload.device_keys {
            Some(keys) => {
                if keys.device != *device {
                    return Err(Error::NotYourDevice {
                        actor: device.to_string(),
                        target: keys.device.to_string(),
                    });
                }
                keys.ed25519
            }
            None => self.stored_signing_key(device).await?,
        };
        for (i, key) in upload.one_time_keys.iter().enumerate() {
            verify_key(device, &signing_key, key, format!("one_time_keys[{i}]"))?;
        }
        if let Some(key) = &upload.fallback_key {
            verify_key(device, &signing_key, key, "fallback_key".into())?;
        }

        // Everything verified: write, device first.
        if let Some(keys) = &upload.device_keys {
            let new_device = match self.store.put_device(&keys.to_row(now)).await? {
                PutDevice::Inserted => true,
                PutDevice::Unchanged => false,
                PutDevice::Conflict(_) => return Err(Error::OtherKeys(device.to_string())),
            };
            span.record("new_device", new_device);
            if new_device {
                self.announce(device).await;
            }
        }
        let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());
        if !upload.one_time_keys.is_empty() {
            let stored = self.store.count_one_time_keys(user, dev).await?;
            let would_hold = stored + upload.one_time_keys.len() as u64;
            if would_hold > self.config.max_stored_one_time_keys {
                return Err(Error::OneTimeKeyQuota {
                    device: device.to_string(),
                    would_hold,
                    max: self.config.max_stored_one_time_keys,
                    retry_after: self.config.quota_retry_after,
                });
            }
        }
        if let Some(key) = &upload.fallback_key {
            match self
                .store
                .put_fallback_key(user, dev, &key.to_row())
                .await?
            {
                PutFallback::Stored | PutFallback::Unchanged => {}
                PutFallback::Stale => return Err(Error::StaleFallback(device.to_string())),
            }
        }
        let count = if upload.one_time_keys.is_empty() {
            self.store.count_one_time_keys(user, dev).await?
        } else {
            let rows: Vec<_> = upload
                .one_time_keys
                .iter()
                .map(OneTimeKey::to_row)
                .collect();
            match self.store.add_one_time_keys(user, dev, &rows).await {
                Err(chappe_storage::Error::Conflict(detail)) => {
                    return Err(Error::KeyIdReused {
                        device: device.to_string(),
                        detail,
                    });
                }
                other => other?,
            }
        };
        tracing::debug!(count, "keys uploaded");
        Ok(v1::UploadKeysResponse {
            one_time_key_count: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    /// Every device of the asked users, as stored.
    #[tracing::instrument(skip_all, fields(user, device, users))]
    pub async fn query_devices(
        &self,
        req: internal::QueryDevices,
    ) -> Result<v1::QueryDevicesResponse> {
        if let Some(r) = &req.request {
            check_count("user_ids", r.user_ids.len(), self.config.max_query_users)?;
        }
        let query = Query::try_from(req)?;
        let span = tracing::Span::current();
        span.record("user", query.actor.user_id.as_str());
        span.record("device", query.actor.device_id.as_str());
        span.record("users", query.user_ids.len());
        let mut devices = Vec::new();
        for user in &query.user_ids {
            let rows = self.store.list_devices(user.as_str()).await?;
            devices.extend(rows.into_iter().map(convert::device_keys_to_wire));
        }
        Ok(v1::QueryDevicesResponse { devices })
    }

    /// One one-time key (or the fallback key) per asked device.
    #[tracing::instrument(skip_all, fields(user, device, devices))]
    pub async fn claim_keys(&self, req: internal::ClaimKeys) -> Result<v1::ClaimKeysResponse> {
        if let Some(r) = &req.request {
            check_count("devices", r.devices.len(), self.config.max_claim_devices)?;
        }
        let claim = Claim::try_from(req)?;
        let span = tracing::Span::current();
        span.record("user", claim.actor.user_id.as_str());
        span.record("device", claim.actor.device_id.as_str());
        span.record("devices", claim.devices.len());
        let store = &self.store;
        let results: Vec<_> = futures::stream::iter(claim.devices)
            .map(|device| async move {
                let claimed = store
                    .claim_key(device.user_id.as_str(), device.device_id.as_str())
                    .await;
                (device, claimed)
            })
            .buffered(self.config.claim_concurrency.max(1))
            .collect()
            .await;
        let mut response = v1::ClaimKeysResponse::default();
        for (device, claimed) in results {
            match claimed? {
                Some(key) => response
                    .keys
                    .push(convert::claimed_key_to_wire(&device, key)),
                None => response.unavailable.push(v1::DeviceRef::from(&device)),
            }
        }
        Ok(response)
    }

    fn check_not_future(&self, now: i64, upload: &Upload) -> Result<()> {
        let max_skew = self.config.max_future_skew;
        let limit = now.saturating_add(i64::try_from(max_skew.as_millis()).unwrap_or(i64::MAX));
        let check = |field: String, at: i64| {
            if at > limit {
                Err(Error::FromTheFuture {
                    field,
                    ahead_ms: at - now,
                    max_skew,
                })
            } else {
                Ok(())
            }
        };
        if let Some(keys) = &upload.device_keys {
            check("device_keys.created_at_ms".into(), keys.created_at_ms)?;
        }
        for (i, key) in upload.one_time_keys.iter().enumerate() {
            check(
                format!("one_time_keys[{i}].created_at_ms"),
                key.created_at_ms,
            )?;
        }
        if let Some(key) = &upload.fallback_key {
            check("fallback_key.created_at_ms".into(), key.created_at_ms)?;
        }
        Ok(())
    }

    async fn stored_signing_key(&self, device: &DeviceRef) -> Result<Ed25519PublicKey> {
        let row = self
            .store
            .get_device(device.user_id.as_str(), device.device_id.as_str())
            .await?
            .ok_or_else(|| Error::UnknownDevice(device.to_string()))?;
        Ed25519PublicKey::from_base64(&row.ed25519).map_err(|e| {
            Error::Store(chappe_storage::Error::Corrupt {
                table: "device_keys",
                detail: format!("ed25519 of {device}: {e}"),
            })
        })
    }

    /// Tells subscribers that `device` joined its user's device list. The
    /// keys are stored whatever happens here, so a failure is only logged.
    async fn announce(&self, device: &DeviceRef) {
        let event = internal::KeysChanged {
            user_id: device.user_id.to_string(),
            device_id: device.device_id.to_string(),
        };
        let subject = self.subjects.evt_keys(&device.user_id);
        let payload = Bytes::from(event.encode_to_vec());
        if let Err(e) = self.bus.publish(&subject, Headers::new(), payload).await {
            tracing::warn!(%subject, error = %e, "device list change not published");
        }
    }
}

fn verify_key(
    device: &DeviceRef,
    signing_key: &Ed25519PublicKey,
    key: &OneTimeKey,
    what: String,
) -> Result<()> {
    if key.verify(device, signing_key) {
        Ok(())
    } else {
        Err(Error::BadSignature { what })
    }
}

fn check_count(field: &'static str, count: usize, max: usize) -> Result<()> {
    if count > max {
        return Err(Error::TooMany { field, count, max });
    }
    Ok(())
}
