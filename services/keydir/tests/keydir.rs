//! keydir through the bus, exactly as the gateway calls it, against a real
//! embedded store and real vodozemac devices.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chappe_bus::memory::MemoryBus;
use chappe_bus::rpc::{self, RunningServer};
use chappe_bus::subjects::KeydirMethod;
use chappe_bus::{Bus, Headers, RpcError, Subjects};
use chappe_keydir::KeydirConfig;
use chappe_proto::ids::UserId;
use chappe_proto::internal::{self, ServiceReply, service_reply};
use chappe_proto::signing;
use chappe_proto::v1::{self, DeviceRef};
use chappe_storage::EmbeddedStore;
use futures::StreamExt;
use prost::Message as _;
use tonic::Code;
use vodozemac::olm::Account;

const TIMEOUT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

// ------------------------------------------------------------ test device

/// A real client device: a vodozemac account that signs what it uploads.
struct Device {
    account: Account,
    user_id: String,
    device_id: String,
    created_at_ms: i64,
}

impl Device {
    fn new(user_id: &str, device_id: &str) -> Self {
        Self {
            account: Account::new(),
            user_id: user_id.into(),
            device_id: device_id.into(),
            created_at_ms: now_ms(),
        }
    }

    fn actor(&self) -> DeviceRef {
        DeviceRef {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
        }
    }

    fn device_keys(&self) -> v1::DeviceKeys {
        let keys = self.account.identity_keys();
        let (curve, ed) = (keys.curve25519.to_base64(), keys.ed25519.to_base64());
        let bytes = signing::device_keys_bytes(
            &self.user_id,
            &self.device_id,
            &curve,
            &ed,
            self.created_at_ms,
        );
        v1::DeviceKeys {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            curve25519: curve,
            ed25519: ed,
            signature: self.account.sign(&bytes).to_base64(),
            created_at_ms: self.created_at_ms,
        }
    }

    /// A key of this device signed by `signer`'s account (itself, normally).
    fn signed_key_by(
        &self,
        signer: &Device,
        key_id: &str,
        curve25519: &str,
        fallback: bool,
        created_at_ms: i64,
    ) -> v1::OneTimeKey {
        let bytes = signing::one_time_key_bytes(
            &self.user_id,
            &self.device_id,
            key_id,
            curve25519,
            fallback,
            created_at_ms,
        );
        v1::OneTimeKey {
            key_id: key_id.into(),
            curve25519: curve25519.into(),
            signature: signer.account.sign(&bytes).to_base64(),
            fallback,
            created_at_ms,
        }
    }

    fn signed_key(
        &self,
        key_id: &str,
        curve25519: &str,
        fallback: bool,
        at: i64,
    ) -> v1::OneTimeKey {
        self.signed_key_by(self, key_id, curve25519, fallback, at)
    }

    /// `n` fresh one-time keys, signed, and marked published.
    fn one_time_keys(&mut self, n: usize) -> Vec<v1::OneTimeKey> {
        self.account.generate_one_time_keys(n);
        let now = now_ms();
        let keys: Vec<_> = self
            .account
            .one_time_keys()
            .into_iter()
            .map(|(id, key)| self.signed_key(&id.to_base64(), &key.to_base64(), false, now))
            .collect();
        self.account.mark_keys_as_published();
        keys
    }

    /// A fresh fallback key dated `created_at_ms`, signed.
    fn fallback_key(&mut self, created_at_ms: i64) -> v1::OneTimeKey {
        self.account.generate_fallback_key();
        let (id, key) = self.account.fallback_key().into_iter().next().unwrap();
        self.account.mark_keys_as_published();
        self.signed_key(&id.to_base64(), &key.to_base64(), true, created_at_ms)
    }

    fn upload(
        &self,
        device_keys: bool,
        one_time_keys: Vec<v1::OneTimeKey>,
        fallback_key: Option<v1::OneTimeKey>,
    ) -> internal::UploadKeys {
        internal::UploadKeys {
            actor: Some(self.actor()),
            request: Some(v1::UploadKeysRequest {
                device_keys: device_keys.then(|| self.device_keys()),
                one_time_keys,
                fallback_key,
            }),
        }
    }
}

// ---------------------------------------------------------------- harness

struct Keydir {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    _server: RunningServer,
    _dir: tempfile::TempDir,
}

async fn keydir(config: KeydirConfig) -> Keydir {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("keydir.db")).unwrap();
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
    let subjects = Subjects::default();
    let server = chappe_keydir::start(config, Arc::new(store), bus.clone(), subjects.clone())
        .await
        .unwrap();
    Keydir {
        bus,
        subjects,
        _server: server,
        _dir: dir,
    }
}

impl Keydir {
    async fn upload(&self, req: internal::UploadKeys) -> Result<v1::UploadKeysResponse, RpcError> {
        let subject = self.subjects.keydir(KeydirMethod::UploadKeys);
        rpc::call(&*self.bus, &subject, &req, TIMEOUT).await
    }

    async fn query(
        &self,
        actor: DeviceRef,
        users: &[&str],
    ) -> Result<v1::QueryDevicesResponse, RpcError> {
        let req = internal::QueryDevices {
            actor: Some(actor),
            request: Some(v1::QueryDevicesRequest {
                user_ids: users.iter().map(|u| u.to_string()).collect(),
            }),
        };
        let subject = self.subjects.keydir(KeydirMethod::QueryDevices);
        rpc::call(&*self.bus, &subject, &req, TIMEOUT).await
    }

    async fn claim(
        &self,
        actor: DeviceRef,
        devices: Vec<DeviceRef>,
    ) -> Result<v1::ClaimKeysResponse, RpcError> {
        claim(&*self.bus, &self.subjects, actor, devices).await
    }
}

async fn claim(
    bus: &dyn Bus,
    subjects: &Subjects,
    actor: DeviceRef,
    devices: Vec<DeviceRef>,
) -> Result<v1::ClaimKeysResponse, RpcError> {
    let req = internal::ClaimKeys {
        actor: Some(actor),
        request: Some(v1::ClaimKeysRequest { devices }),
    };
    rpc::call(
        bus,
        &subjects.keydir(KeydirMethod::ClaimKeys),
        &req,
        TIMEOUT,
    )
    .await
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, RpcError>, code: Code) -> RpcError {
    let err = result.expect_err("the call should fail");
    assert_eq!(err.code, code, "unexpected status: {err}");
    err
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn a_good_upload_is_served_to_queries() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");
    let otks = alice.one_time_keys(5);
    let fallback = alice.fallback_key(now_ms());
    let resp = kd
        .upload(alice.upload(true, otks, Some(fallback)))
        .await
        .unwrap();
    assert_eq!(resp.one_time_key_count, 5);

    let bob = Device::new("bob", "PHONE");
    let found = kd
        .query(bob.actor(), &["alice", "alice", "nobody"])
        .await
        .unwrap();
    assert_eq!(found.devices, vec![alice.device_keys()]);
}

#[tokio::test]
async fn identical_reupload_is_idempotent_and_other_keys_are_refused() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");
    let otks = alice.one_time_keys(3);
    kd.upload(alice.upload(true, otks.clone(), None))
        .await
        .unwrap();
    // Same device keys and the same one-time keys again: nothing changes.
    let resp = kd.upload(alice.upload(true, otks, None)).await.unwrap();
    assert_eq!(resp.one_time_key_count, 3);
    // Later uploads may leave the device keys out.
    let more = alice.one_time_keys(2);
    let resp = kd.upload(alice.upload(false, more, None)).await.unwrap();
    assert_eq!(resp.one_time_key_count, 5);

    // Another account claiming the same device id.
    let impostor = Device::new("alice", "LAPTOP");
    let err = assert_code(
        kd.upload(impostor.upload(true, vec![], None)).await,
        Code::AlreadyExists,
    );
    assert!(err.message.contains("new device id"), "{err}");
    let found = kd.query(alice.actor(), &["alice"]).await.unwrap();
    assert_eq!(found.devices, vec![alice.device_keys()]);
}

#[tokio::test]
async fn signatures_must_verify() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");

    // Device keys whose self-signature is over other bytes.
    let mut req = alice.upload(true, vec![], None);
    let keys = req.request.as_mut().unwrap().device_keys.as_mut().unwrap();
    keys.created_at_ms += 1;
    let err = assert_code(kd.upload(req).await, Code::InvalidArgument);
    assert!(
        err.message
            .contains("device keys signature does not verify"),
        "{err}"
    );

    // A one-time key of alice's device signed by another device.
    let mallory = Device::new("mallory", "EVIL");
    let key = alice.one_time_keys(1).remove(0);
    let forged = alice.signed_key_by(
        &mallory,
        &key.key_id,
        &key.curve25519,
        false,
        key.created_at_ms,
    );
    let err = assert_code(
        kd.upload(alice.upload(true, vec![forged], None)).await,
        Code::InvalidArgument,
    );
    assert!(
        err.message
            .contains("one_time_keys[0] signature does not verify"),
        "{err}"
    );

    // A one-time key signed as a fallback key.
    let as_fallback = alice.signed_key(&key.key_id, &key.curve25519, true, key.created_at_ms);
    assert_code(
        kd.upload(alice.upload(true, vec![as_fallback], None)).await,
        Code::InvalidArgument,
    );

    // Nothing above was stored.
    assert!(
        kd.query(alice.actor(), &["alice"])
            .await
            .unwrap()
            .devices
            .is_empty()
    );
    // The genuine key goes in.
    kd.upload(alice.upload(true, vec![key], None))
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_fields_are_named() {
    let kd = keydir(KeydirConfig::default()).await;
    let alice = Device::new("alice", "LAPTOP");

    let mut req = alice.upload(true, vec![], None);
    let keys = req.request.as_mut().unwrap().device_keys.as_mut().unwrap();
    keys.curve25519 = "not a key".into();
    let err = assert_code(kd.upload(req).await, Code::InvalidArgument);
    assert!(err.message.contains("device_keys.curve25519"), "{err}");

    // Padded base64 is not the canonical form.
    let mut req = alice.upload(true, vec![], None);
    let keys = req.request.as_mut().unwrap().device_keys.as_mut().unwrap();
    keys.ed25519.push('=');
    let err = assert_code(kd.upload(req).await, Code::InvalidArgument);
    assert!(err.message.contains("device_keys.ed25519"), "{err}");

    // No actor at all: the gateway did not authenticate.
    let mut req = alice.upload(true, vec![], None);
    req.actor = None;
    let err = assert_code(kd.upload(req).await, Code::InvalidArgument);
    assert!(err.message.contains("actor"), "{err}");
}

#[tokio::test]
async fn a_device_id_that_looks_like_a_key_is_refused() {
    let kd = keydir(KeydirConfig::default()).await;
    let key_like = Device::new("alice", "LAPTOP").device_keys().curve25519;
    assert_eq!(key_like.len(), 43);
    let dev = Device::new("alice", &key_like);
    let err = assert_code(
        kd.upload(dev.upload(true, vec![], None)).await,
        Code::InvalidArgument,
    );
    assert!(err.message.contains("device_id"), "{err}");
}

#[tokio::test]
async fn a_device_uploads_only_its_own_keys() {
    let kd = keydir(KeydirConfig::default()).await;
    let alice = Device::new("alice", "LAPTOP");
    let mut req = alice.upload(true, vec![], None);
    req.actor = Some(DeviceRef {
        user_id: "alice".into(),
        device_id: "PHONE".into(),
    });
    assert_code(kd.upload(req.clone()).await, Code::PermissionDenied);
    req.actor = Some(DeviceRef {
        user_id: "bob".into(),
        device_id: "LAPTOP".into(),
    });
    assert_code(kd.upload(req).await, Code::PermissionDenied);
}

#[tokio::test]
async fn the_first_upload_needs_device_keys() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");
    let otks = alice.one_time_keys(2);
    assert_code(
        kd.upload(alice.upload(false, otks, None)).await,
        Code::FailedPrecondition,
    );
}

#[tokio::test]
async fn a_stale_fallback_key_is_refused_and_a_reused_key_id_conflicts() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");
    let now = now_ms();
    let newer = alice.fallback_key(now);
    kd.upload(alice.upload(true, vec![], Some(newer)))
        .await
        .unwrap();
    let older = alice.fallback_key(now - 60_000);
    assert_code(
        kd.upload(alice.upload(false, vec![], Some(older))).await,
        Code::FailedPrecondition,
    );

    let key = alice.one_time_keys(1).remove(0);
    kd.upload(alice.upload(false, vec![key.clone()], None))
        .await
        .unwrap();
    let other = alice.one_time_keys(1).remove(0);
    let reuse = alice.signed_key(&key.key_id, &other.curve25519, false, other.created_at_ms);
    assert_code(
        kd.upload(alice.upload(false, vec![reuse], None)).await,
        Code::AlreadyExists,
    );
}

#[tokio::test]
async fn keys_from_the_future_are_refused() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");
    let later = now_ms() + 3_600_000;
    let key = alice.fallback_key(later);
    let err = assert_code(
        kd.upload(alice.upload(true, vec![], Some(key))).await,
        Code::InvalidArgument,
    );
    assert!(err.message.contains("fallback_key.created_at_ms"), "{err}");
}

#[tokio::test]
async fn one_time_key_limits() {
    let config = KeydirConfig {
        max_one_time_keys_per_upload: 8,
        max_stored_one_time_keys: 12,
        quota_retry_after: Duration::from_secs(60),
        ..KeydirConfig::default()
    };
    let kd = keydir(config).await;
    let mut alice = Device::new("alice", "LAPTOP");

    // Too many in one request: the request itself is wrong.
    let otks = alice.one_time_keys(9);
    let err = assert_code(
        kd.upload(alice.upload(true, otks, None)).await,
        Code::InvalidArgument,
    );
    assert!(err.message.contains("one_time_keys"), "{err}");

    let otks = alice.one_time_keys(8);
    assert_eq!(
        kd.upload(alice.upload(true, otks, None))
            .await
            .unwrap()
            .one_time_key_count,
        8
    );
    // 8 stored + 5 would go over 12: come back later.
    let otks = alice.one_time_keys(5);
    let err = assert_code(
        kd.upload(alice.upload(false, otks.clone(), None)).await,
        Code::ResourceExhausted,
    );
    assert_eq!(err.retry_after, Some(Duration::from_secs(60)));

    // Once two keys are claimed, the same upload fits... minus one.
    let bob = Device::new("bob", "PHONE");
    for _ in 0..2 {
        kd.claim(bob.actor(), vec![alice.actor()]).await.unwrap();
    }
    let otks: Vec<_> = otks.into_iter().take(4).collect();
    assert_eq!(
        kd.upload(alice.upload(false, otks, None))
            .await
            .unwrap()
            .one_time_key_count,
        10
    );
}

#[tokio::test]
async fn a_new_device_is_announced_once() {
    let kd = keydir(KeydirConfig::default()).await;
    let user = UserId::parse("alice.martin").unwrap();
    let mut events = kd
        .bus
        .subscribe(&kd.subjects.evt_keys(&user))
        .await
        .unwrap();

    let mut laptop = Device::new("alice.martin", "LAPTOP");
    kd.upload(laptop.upload(true, vec![], None)).await.unwrap();
    let event = tokio::time::timeout(TIMEOUT, events.next())
        .await
        .unwrap()
        .unwrap();
    let event = internal::KeysChanged::decode(event.payload).unwrap();
    assert_eq!(
        event,
        internal::KeysChanged {
            user_id: "alice.martin".into(),
            device_id: "LAPTOP".into(),
        }
    );

    // Re-uploads of a known device announce nothing.
    let otks = laptop.one_time_keys(2);
    kd.upload(laptop.upload(true, otks, None)).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(nothing.is_err(), "unexpected event: {nothing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_hand_out_each_key_once() {
    let kd = keydir(KeydirConfig::default()).await;
    let mut alice = Device::new("alice", "LAPTOP");
    let otks = alice.one_time_keys(10);
    let fallback = alice.fallback_key(now_ms());
    kd.upload(alice.upload(true, otks.clone(), Some(fallback.clone())))
        .await
        .unwrap();

    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let bus = kd.bus.clone();
            let subjects = kd.subjects.clone();
            let target = alice.actor();
            tokio::spawn(async move {
                let actor = DeviceRef {
                    user_id: format!("user{i}"),
                    device_id: "D".into(),
                };
                claim(&*bus, &subjects, actor, vec![target]).await
            })
        })
        .collect();
    let mut claimed: HashMap<String, usize> = HashMap::new();
    let mut fallbacks = 0;
    for task in tasks {
        let resp = task.await.unwrap().unwrap();
        assert!(resp.unavailable.is_empty());
        assert_eq!(resp.keys.len(), 1);
        let got = resp.keys[0].key.clone().unwrap();
        assert_eq!(
            (
                resp.keys[0].user_id.as_str(),
                resp.keys[0].device_id.as_str()
            ),
            ("alice", "LAPTOP")
        );
        if got.fallback {
            assert_eq!(got, fallback);
            fallbacks += 1;
        } else {
            *claimed.entry(got.key_id.clone()).or_default() += 1;
            assert!(otks.contains(&got), "not an uploaded key: {got:?}");
        }
    }
    assert_eq!(fallbacks, 40);
    assert_eq!(claimed.len(), 10);
    assert!(claimed.values().all(|n| *n == 1), "{claimed:?}");
}

#[tokio::test]
async fn unknown_devices_are_unavailable() {
    let kd = keydir(KeydirConfig::default()).await;
    let alice = Device::new("alice", "LAPTOP");
    // A device with neither one-time nor fallback key.
    kd.upload(alice.upload(true, vec![], None)).await.unwrap();
    let ghost = DeviceRef {
        user_id: "nobody".into(),
        device_id: "GHOST".into(),
    };
    let resp = kd
        .claim(
            alice.actor(),
            vec![ghost.clone(), alice.actor(), ghost.clone()],
        )
        .await
        .unwrap();
    assert!(resp.keys.is_empty());
    assert_eq!(resp.unavailable, vec![ghost, alice.actor()]);

    let bad = DeviceRef {
        user_id: "Not A User".into(),
        device_id: "X".into(),
    };
    let err = assert_code(
        kd.claim(alice.actor(), vec![bad]).await,
        Code::InvalidArgument,
    );
    assert!(err.message.contains("devices[0].user_id"), "{err}");
}

#[tokio::test]
async fn a_malformed_request_does_not_stop_the_service() {
    let kd = keydir(KeydirConfig::default()).await;
    for method in KeydirMethod::ALL {
        let reply = kd
            .bus
            .request(
                &kd.subjects.keydir(method),
                Headers::new(),
                Bytes::from_static(&[0xff, 0xff, 0xff]),
                TIMEOUT,
            )
            .await
            .unwrap();
        let reply = ServiceReply::decode(reply.payload).unwrap();
        match reply.result {
            Some(service_reply::Result::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as u32)
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    let alice = Device::new("alice", "LAPTOP");
    kd.upload(alice.upload(true, vec![], None)).await.unwrap();
    assert_eq!(
        kd.query(alice.actor(), &["alice"])
            .await
            .unwrap()
            .devices
            .len(),
        1
    );
}

#[tokio::test]
async fn query_limits() {
    let kd = keydir(KeydirConfig {
        max_query_users: 2,
        max_claim_devices: 2,
        ..KeydirConfig::default()
    })
    .await;
    let alice = Device::new("alice", "LAPTOP");
    assert_code(
        kd.query(alice.actor(), &["a", "b", "c"]).await,
        Code::InvalidArgument,
    );
    let err = assert_code(
        kd.query(alice.actor(), &["a", "B"]).await,
        Code::InvalidArgument,
    );
    assert!(err.message.contains("user_ids[1]"), "{err}");
    assert_code(
        kd.claim(alice.actor(), vec![alice.actor(); 3]).await,
        Code::InvalidArgument,
    );
}
