//! media through the bus, as a gateway calls it: the in-process bus, an
//! embedded store in a temporary directory, the real fanout answering
//! membership questions on the same bus and store, and a clock the tests
//! move by hand.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chappe_bus::memory::MemoryBus;
use chappe_bus::rpc::{self, Code};
use chappe_bus::subjects::{FanoutMethod, MediaMethod};
use chappe_bus::{Bus, Headers, RpcError, Subjects};
use chappe_fanout::{Fanout, FanoutConfig};
use chappe_media::{ManualClock, Media, MediaConfig};
use chappe_proto::ids::ConversationId;
use chappe_proto::internal::{
    CreateConversation, MediaBegin, MediaGetChunk, MediaOpen, MediaPutChunk, MediaStatus,
    ServiceReply, service_reply,
};
use chappe_proto::v1::{
    ConversationKind, CreateConversationRequest, CreateConversationResponse, DeviceRef, MediaChunk,
    MediaInfo, MediaUploadStart,
};
use chappe_storage::{EmbeddedStore, MediaRepo};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Where the manual clock starts (November 2023).
const T0: i64 = 1_700_000_000_000;
/// Chunks in these tests: small, so that objects have several.
const CHUNK: u32 = 16;

/// Limits small enough to reach in a test.
fn config() -> MediaConfig {
    MediaConfig {
        max_upload_bytes: 1_000,
        max_chunk_bytes: 64,
        quota_bytes: 10_000,
        quota_window: Duration::from_secs(60),
        retention: Duration::from_secs(3_600),
        fanout_timeout: Duration::from_secs(2),
        ..MediaConfig::default()
    }
}

struct Harness {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    store: EmbeddedStore,
    clock: Arc<ManualClock>,
    media: Media,
    fanout: Option<Fanout>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(config: MediaConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("chappe.db")).unwrap();
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
        let subjects = Subjects::default();
        let fanout = Fanout::start(
            FanoutConfig::default(),
            Arc::new(store.clone()),
            bus.clone(),
            subjects.clone(),
        )
        .await
        .unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let media = Media::start(
            config,
            Arc::new(store.clone()),
            bus.clone(),
            subjects.clone(),
            clock.clone(),
        )
        .await
        .unwrap();
        Harness {
            bus,
            subjects,
            store,
            clock,
            media,
            fanout: Some(fanout),
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(fanout) = self.fanout.take() {
            fanout.stop().await;
        }
        self.media.stop().await;
    }

    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: MediaMethod,
        request: &Req,
    ) -> Result<Resp, RpcError> {
        rpc::call(&*self.bus, &self.subjects.media(method), request, TIMEOUT).await
    }

    /// A group of `creator` and `others`, created through fanout.
    async fn conversation(&self, creator: &str, others: &[&str]) -> String {
        let request = CreateConversation {
            actor: actor(creator),
            request: Some(CreateConversationRequest {
                kind: ConversationKind::Group as i32,
                member_user_ids: others.iter().map(|u| u.to_string()).collect(),
            }),
        };
        let created: CreateConversationResponse = rpc::call(
            &*self.bus,
            &self.subjects.fanout(FanoutMethod::CreateConversation),
            &request,
            TIMEOUT,
        )
        .await
        .unwrap();
        created.conversation.unwrap().conversation_id
    }

    async fn begin(&self, user: &str, start: &MediaUploadStart) -> Result<MediaInfo, RpcError> {
        let request = MediaBegin {
            actor: actor(user),
            start: Some(start.clone()),
        };
        self.call(MediaMethod::Begin, &request).await
    }

    async fn put_chunk(
        &self,
        user: &str,
        media_id: &str,
        chunk: MediaChunk,
    ) -> Result<MediaInfo, RpcError> {
        let request = MediaPutChunk {
            actor: actor(user),
            media_id: media_id.into(),
            chunk: Some(chunk),
        };
        self.call(MediaMethod::PutChunk, &request).await
    }

    /// Puts chunk `index` of `data`, with its true hash.
    async fn put(
        &self,
        user: &str,
        media_id: &str,
        data: &[u8],
        index: u32,
    ) -> Result<MediaInfo, RpcError> {
        self.put_chunk(user, media_id, chunk_of(data, index)).await
    }

    async fn status(&self, user: &str, media_id: &str) -> Result<MediaInfo, RpcError> {
        let request = MediaStatus {
            actor: actor(user),
            media_id: media_id.into(),
        };
        self.call(MediaMethod::Status, &request).await
    }

    async fn open(&self, user: &str, media_id: &str) -> Result<MediaInfo, RpcError> {
        let request = MediaOpen {
            actor: actor(user),
            media_id: media_id.into(),
        };
        self.call(MediaMethod::Open, &request).await
    }

    async fn get_chunk(
        &self,
        user: &str,
        media_id: &str,
        index: u32,
    ) -> Result<MediaChunk, RpcError> {
        let request = MediaGetChunk {
            actor: actor(user),
            media_id: media_id.into(),
            index,
        };
        self.call(MediaMethod::GetChunk, &request).await
    }

    /// Uploads `data` whole as `user` into `conversation`; returns its id
    /// and the last answer.
    async fn upload(&self, user: &str, conversation: &str, data: &[u8]) -> (String, MediaInfo) {
        let start = start_of(conversation, data);
        let info = self.begin(user, &start).await.unwrap();
        assert_eq!(info.stored_chunks, 0);
        let mut last = info;
        for index in 0..last.chunk_count {
            last = self.put(user, &start.media_id, data, index).await.unwrap();
        }
        (start.media_id, last)
    }

    /// Downloads an object as `user`, checking each chunk's hash.
    async fn download(&self, user: &str, media_id: &str) -> Result<Vec<u8>, RpcError> {
        let info = self.open(user, media_id).await?;
        let mut data = Vec::new();
        for index in 0..info.chunk_count {
            let chunk = self.get_chunk(user, media_id, index).await?;
            assert_eq!(chunk.index, index);
            assert_eq!(chunk.sha256, sha(&chunk.data));
            data.extend_from_slice(&chunk.data);
        }
        assert_eq!(sha(&data), info.sha256);
        Ok(data)
    }
}

fn actor(user: &str) -> Option<DeviceRef> {
    Some(DeviceRef {
        user_id: user.into(),
        device_id: "D1".into(),
    })
}

/// A fresh media id: 32 random lowercase hex digits.
fn media_id() -> String {
    ConversationId::random().to_string()[1..].to_owned()
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// `len` bytes of made-up ciphertext.
fn ciphertext(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn start_of(conversation: &str, data: &[u8]) -> MediaUploadStart {
    MediaUploadStart {
        media_id: media_id(),
        conversation_id: conversation.into(),
        size: data.len() as u64,
        chunk_size: CHUNK,
        sha256: sha(data),
    }
}

fn chunk_of(data: &[u8], index: u32) -> MediaChunk {
    let from = (index * CHUNK) as usize;
    let to = (from + CHUNK as usize).min(data.len());
    let bytes = data[from..to].to_vec();
    MediaChunk {
        index,
        sha256: sha(&bytes),
        data: bytes,
    }
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(result: Result<T, RpcError>, code: Code) -> RpcError {
    match result {
        Err(e) if e.code == code => e,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_completes_and_members_download_it() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let data = ciphertext(70, 1);
    let start = start_of(&conversation, &data);
    let info = h.begin("alice", &start).await.unwrap();
    assert_eq!(
        info,
        MediaInfo {
            media_id: start.media_id.clone(),
            owner_user_id: "alice".into(),
            size: 70,
            chunk_size: CHUNK,
            chunk_count: 5,
            stored_chunks: 0,
            complete: false,
            sha256: sha(&data),
            created_at_ms: T0,
            expires_at_ms: T0 + 3_600_000,
        }
    );
    for index in 0..4 {
        let info = h.put("alice", &start.media_id, &data, index).await.unwrap();
        assert_eq!(info.stored_chunks, index + 1);
        assert!(!info.complete);
    }
    let last = h.put("alice", &start.media_id, &data, 4).await.unwrap();
    assert_eq!(last.stored_chunks, 5);
    assert!(last.complete, "the last chunk completes the object");
    assert_eq!(h.status("alice", &start.media_id).await.unwrap(), last);

    for member in ["alice", "bob"] {
        assert_eq!(h.open(member, &start.media_id).await.unwrap(), last);
        assert_eq!(h.download(member, &start.media_id).await.unwrap(), data);
    }
    // A chunk past the end is out of range.
    let past = h.get_chunk("bob", &start.media_id, 5).await;
    assert_code(past, Code::OutOfRange);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_upload_resumes_where_it_stopped() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let data = ciphertext(70, 2);
    let start = start_of(&conversation, &data);
    h.begin("alice", &start).await.unwrap();
    for index in 0..3 {
        h.put("alice", &start.media_id, &data, index).await.unwrap();
    }

    // The client lost its connection; it begins again and learns where to go on.
    let resumed = h.begin("alice", &start).await.unwrap();
    assert_eq!(resumed.stored_chunks, 3);
    assert!(!resumed.complete);
    assert_eq!(resumed.created_at_ms, T0);
    assert_eq!(h.status("alice", &start.media_id).await.unwrap(), resumed);

    // A chunk it sent already is accepted again; one ahead is refused.
    let again = h.put("alice", &start.media_id, &data, 1).await.unwrap();
    assert_eq!(again.stored_chunks, 3);
    let ahead = h.put("alice", &start.media_id, &data, 4).await;
    let e = assert_code(ahead, Code::FailedPrecondition);
    assert!(
        e.message.contains("next chunk to send is 3"),
        "{}",
        e.message
    );
    // The same index with other content is refused, and changes nothing.
    let other = chunk_of(&ciphertext(70, 9), 2);
    let differs = h.put_chunk("alice", &start.media_id, other).await;
    assert_code(differs, Code::FailedPrecondition);

    h.put("alice", &start.media_id, &data, 3).await.unwrap();
    let done = h.put("alice", &start.media_id, &data, 4).await.unwrap();
    assert!(done.complete);
    assert_eq!(h.download("bob", &start.media_id).await.unwrap(), data);
    // Sending the last chunk again, or beginning again, changes nothing.
    assert_eq!(
        h.put("alice", &start.media_id, &data, 4).await.unwrap(),
        done
    );
    assert_eq!(h.begin("alice", &start).await.unwrap(), done);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_over_the_size_limit_is_refused_at_its_start() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &[]).await;
    let start = MediaUploadStart {
        size: 1_001,
        ..start_of(&conversation, &ciphertext(10, 0))
    };
    let e = assert_code(h.begin("alice", &start).await, Code::ResourceExhausted);
    assert!(e.message.contains("max_upload_bytes"), "{}", e.message);
    assert!(e.message.contains("1000"), "{}", e.message);
    assert_eq!(e.retry_after, None, "waiting does not help");
    assert!(h.store.get_object(&start.media_id).await.unwrap().is_none());
    // The limit itself is fine.
    let at_limit = MediaUploadStart {
        size: 1_000,
        ..start
    };
    h.begin("alice", &at_limit).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_that_does_not_match_its_hash_is_not_kept() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &[]).await;
    let data = ciphertext(40, 3);
    let start = start_of(&conversation, &data);
    h.begin("alice", &start).await.unwrap();

    let mut bad = chunk_of(&data, 0);
    bad.data[0] ^= 0xff;
    let e = assert_code(
        h.put_chunk("alice", &start.media_id, bad).await,
        Code::InvalidArgument,
    );
    assert!(e.message.contains("chunk hash mismatch"), "{}", e.message);
    assert_eq!(
        h.status("alice", &start.media_id)
            .await
            .unwrap()
            .stored_chunks,
        0
    );
    assert!(
        h.store
            .get_chunk(&start.media_id, 0)
            .await
            .unwrap()
            .is_none()
    );

    // A chunk of the wrong length is refused too, before its hash.
    let mut short = chunk_of(&data, 0);
    short.data.pop();
    short.sha256 = sha(&short.data);
    let e = assert_code(
        h.put_chunk("alice", &start.media_id, short).await,
        Code::InvalidArgument,
    );
    assert!(e.message.contains("must be 16"), "{}", e.message);

    let good = h.put("alice", &start.media_id, &data, 0).await.unwrap();
    assert_eq!(good.stored_chunks, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_whose_whole_hash_does_not_match_is_discarded() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let data = ciphertext(40, 4);
    let start = MediaUploadStart {
        sha256: sha(b"something else"),
        ..start_of(&conversation, &data)
    };
    h.begin("alice", &start).await.unwrap();
    h.put("alice", &start.media_id, &data, 0).await.unwrap();
    h.put("alice", &start.media_id, &data, 1).await.unwrap();
    let e = assert_code(
        h.put("alice", &start.media_id, &data, 2).await,
        Code::InvalidArgument,
    );
    assert!(e.message.contains("SHA-256"), "{}", e.message);

    assert!(h.store.get_object(&start.media_id).await.unwrap().is_none());
    for index in 0..3 {
        assert!(
            h.store
                .get_chunk(&start.media_id, index)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_code(h.status("alice", &start.media_id).await, Code::NotFound);
    assert_code(h.open("bob", &start.media_id).await, Code::NotFound);
    // The id is free again: the client can start over.
    let over = start_of(&conversation, &data);
    let again = MediaUploadStart {
        media_id: start.media_id.clone(),
        ..over
    };
    assert_eq!(h.begin("alice", &again).await.unwrap().stored_chunks, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_members_of_a_conversation_it_was_posted_in_download() {
    let h = Harness::start(config()).await;
    let shared = h.conversation("alice", &["bob"]).await;
    let elsewhere = h.conversation("carol", &["dave"]).await;
    let data = ciphertext(40, 5);
    let (id, _) = h.upload("alice", &shared, &data).await;

    assert_code(h.open("carol", &id).await, Code::PermissionDenied);
    assert_code(h.get_chunk("carol", &id, 0).await, Code::PermissionDenied);

    // Uploading into a conversation one is not in, or one that does not
    // exist, is refused too.
    let start = start_of(&elsewhere, &data);
    assert_code(h.begin("alice", &start).await, Code::PermissionDenied);
    let unknown = start_of(&ConversationId::random().to_string(), &data);
    assert_code(h.begin("alice", &unknown).await, Code::PermissionDenied);
    assert!(h.store.get_object(&start.media_id).await.unwrap().is_none());

    // Posting the same media in carol's conversation (the owner begins it
    // again there: nothing is uploaded twice) lets carol download it.
    let forward = h.conversation("alice", &["carol"]).await;
    let original = start_of(&shared, &data);
    let again = MediaUploadStart {
        media_id: id.clone(),
        conversation_id: forward,
        ..original
    };
    let info = h.begin("alice", &again).await.unwrap();
    assert!(info.complete);
    assert_eq!(h.download("carol", &id).await.unwrap(), data);
    assert_code(h.open("dave", &id).await, Code::PermissionDenied);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_owner_uploads_and_sees_an_upload() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let data = ciphertext(40, 6);
    let start = start_of(&conversation, &data);
    h.begin("alice", &start).await.unwrap();
    h.put("alice", &start.media_id, &data, 0).await.unwrap();

    assert_code(
        h.put("bob", &start.media_id, &data, 1).await,
        Code::NotFound,
    );
    assert_code(h.status("bob", &start.media_id).await, Code::NotFound);
    assert_eq!(
        h.status("alice", &start.media_id)
            .await
            .unwrap()
            .stored_chunks,
        1,
        "bob's chunk was not stored"
    );
    // A member may not download it before it is complete.
    assert_code(
        h.open("bob", &start.media_id).await,
        Code::FailedPrecondition,
    );
    assert_code(
        h.get_chunk("bob", &start.media_id, 0).await,
        Code::FailedPrecondition,
    );

    // Nobody else can take the id, and its owner cannot change its fields.
    let e = assert_code(h.begin("bob", &start).await, Code::AlreadyExists);
    assert!(!e.message.contains("alice"), "{}", e.message);
    let other = MediaUploadStart {
        size: 41,
        ..start.clone()
    };
    assert_code(h.begin("alice", &other).await, Code::AlreadyExists);
    assert_code(h.status("alice", &media_id()).await, Code::NotFound);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_over_quota_is_told_when_to_retry() {
    let h = Harness::start(MediaConfig {
        quota_bytes: 100,
        max_upload_bytes: 100,
        quota_window: Duration::from_secs(60),
        ..config()
    })
    .await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let a = start_of(&conversation, &ciphertext(60, 1));
    h.begin("alice", &a).await.unwrap();
    h.clock.advance(Duration::from_secs(10));
    let b = start_of(&conversation, &ciphertext(30, 2));
    h.begin("alice", &b).await.unwrap();
    h.clock.advance(Duration::from_secs(5));
    let d = start_of(&conversation, &ciphertext(10, 3));
    h.begin("alice", &d).await.unwrap(); // exactly the quota: 100 bytes

    // 100 bytes used in the window; 50 more fit once `a` (60 bytes, begun
    // at T0) leaves it, at T0 + 60 s: 45 s from now.
    let c = start_of(&conversation, &ciphertext(50, 4));
    let e = assert_code(h.begin("alice", &c).await, Code::ResourceExhausted);
    assert_eq!(e.retry_after, Some(Duration::from_secs(45)), "{e:?}");
    assert!(e.message.contains("quota"), "{}", e.message);
    assert!(h.store.get_object(&c.media_id).await.unwrap().is_none());

    // Resuming an upload begun already is not counted again, and other
    // users have their own quota.
    assert_eq!(h.begin("alice", &a).await.unwrap().created_at_ms, T0);
    h.begin("bob", &start_of(&conversation, &ciphertext(100, 5)))
        .await
        .unwrap();

    h.clock.set(T0 + 60_000 - 1);
    let e = assert_code(h.begin("alice", &c).await, Code::ResourceExhausted);
    assert_eq!(e.retry_after, Some(Duration::from_millis(1)));
    h.clock.set(T0 + 60_000);
    let info = h.begin("alice", &c).await.unwrap();
    assert_eq!(info.created_at_ms, T0 + 60_000);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_expires_after_its_retention() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let data = ciphertext(40, 7);
    let (old, info) = h.upload("alice", &conversation, &data).await;
    assert_eq!(info.expires_at_ms, T0 + 3_600_000);
    h.clock.advance(Duration::from_secs(60));
    let (young, _) = h.upload("alice", &conversation, &data).await;

    h.clock.set(T0 + 3_600_000);
    // Gone for everyone before the sweeper runs.
    assert_code(h.open("bob", &old).await, Code::NotFound);
    assert_code(h.get_chunk("bob", &old, 0).await, Code::NotFound);
    assert_code(h.status("alice", &old).await, Code::NotFound);
    assert_code(h.put("alice", &old, &data, 0).await, Code::NotFound);
    assert!(h.store.get_object(&old).await.unwrap().is_some());

    assert_eq!(h.media.sweep_now().await.unwrap(), 1);
    assert!(h.store.get_object(&old).await.unwrap().is_none());
    for index in 0..3 {
        assert!(h.store.get_chunk(&old, index).await.unwrap().is_none());
    }
    assert!(h.store.posts(&old).await.unwrap().is_empty());
    assert_code(h.open("bob", &old).await, Code::NotFound);

    // The younger object stays until its own time.
    assert_eq!(h.download("bob", &young).await.unwrap(), data);
    assert_eq!(h.media.sweep_now().await.unwrap(), 0);
    h.clock.advance(Duration::from_secs(60));
    assert_eq!(h.media.sweep_now().await.unwrap(), 1);
    assert!(h.store.get_object(&young).await.unwrap().is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn download_rights_are_remembered_for_the_cache_ttl() {
    let mut h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    let data = ciphertext(40, 8);
    let (id, _) = h.upload("alice", &conversation, &data).await;
    h.open("bob", &id).await.unwrap();

    // Without fanout, a right found within the ttl still holds...
    if let Some(fanout) = h.fanout.take() {
        fanout.stop().await;
    }
    h.clock.advance(Duration::from_secs(29));
    assert_eq!(h.get_chunk("bob", &id, 1).await.unwrap().index, 1);
    // ...others cannot be checked...
    assert_code(h.open("alice", &id).await, Code::Unavailable);
    // ...and past the ttl, bob's cannot either.
    h.clock.advance(Duration::from_secs(1));
    assert_code(h.get_chunk("bob", &id, 2).await, Code::Unavailable);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_are_invalid_arguments() {
    let h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &[]).await;
    let data = ciphertext(40, 9);
    let good = start_of(&conversation, &data);

    let starts = [
        MediaUploadStart {
            media_id: "not-hex".into(),
            ..good.clone()
        },
        MediaUploadStart {
            media_id: good.media_id.to_uppercase(),
            ..good.clone()
        },
        MediaUploadStart {
            media_id: String::new(),
            ..good.clone()
        },
        MediaUploadStart {
            chunk_size: 0,
            ..good.clone()
        },
        MediaUploadStart {
            chunk_size: 65,
            ..good.clone()
        },
        MediaUploadStart {
            size: 0,
            ..good.clone()
        },
        MediaUploadStart {
            sha256: vec![0; 20],
            ..good.clone()
        },
        MediaUploadStart {
            conversation_id: "general".into(),
            ..good.clone()
        },
    ];
    for start in &starts {
        let e = assert_code(h.begin("alice", start).await, Code::InvalidArgument);
        assert!(!e.message.is_empty());
    }
    let no_actor = MediaBegin {
        actor: None,
        start: Some(good.clone()),
    };
    let e = assert_code(
        h.call::<_, MediaInfo>(MediaMethod::Begin, &no_actor).await,
        Code::InvalidArgument,
    );
    assert!(e.message.contains("actor"), "{}", e.message);
    let bad_actor = MediaBegin {
        actor: Some(DeviceRef {
            user_id: "Alice Smith".into(),
            device_id: "D1".into(),
        }),
        start: Some(good.clone()),
    };
    assert_code(
        h.call::<_, MediaInfo>(MediaMethod::Begin, &bad_actor).await,
        Code::InvalidArgument,
    );
    let no_start = MediaBegin {
        actor: actor("alice"),
        start: None,
    };
    assert_code(
        h.call::<_, MediaInfo>(MediaMethod::Begin, &no_start).await,
        Code::InvalidArgument,
    );

    h.begin("alice", &good).await.unwrap();
    let no_chunk = MediaPutChunk {
        actor: actor("alice"),
        media_id: good.media_id.clone(),
        chunk: None,
    };
    assert_code(
        h.call::<_, MediaInfo>(MediaMethod::PutChunk, &no_chunk)
            .await,
        Code::InvalidArgument,
    );
    let mut short_hash = chunk_of(&data, 0);
    short_hash.sha256.truncate(8);
    assert_code(
        h.put_chunk("alice", &good.media_id, short_hash).await,
        Code::InvalidArgument,
    );
    let mut past_end = chunk_of(&data, 0);
    past_end.index = 3;
    assert_code(
        h.put_chunk("alice", &good.media_id, past_end).await,
        Code::InvalidArgument,
    );
    assert_code(h.put("alice", "zz", &data, 0).await, Code::InvalidArgument);
    assert_code(h.status("alice", "").await, Code::InvalidArgument);
    assert_code(h.open("alice", "x").await, Code::InvalidArgument);
    assert_code(h.get_chunk("alice", "x", 0).await, Code::InvalidArgument);
    let no_actor = MediaOpen {
        actor: None,
        media_id: good.media_id.clone(),
    };
    assert_code(
        h.call::<_, MediaInfo>(MediaMethod::Open, &no_actor).await,
        Code::InvalidArgument,
    );

    // Bytes that are not a request at all, on every route.
    for method in [
        MediaMethod::Begin,
        MediaMethod::PutChunk,
        MediaMethod::Status,
        MediaMethod::Open,
        MediaMethod::GetChunk,
    ] {
        let reply = h
            .bus
            .request(
                &h.subjects.media(method),
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
            other => panic!("{method:?}: {other:?}"),
        }
    }
    // The service still works after all that.
    assert_eq!(
        h.status("alice", &good.media_id)
            .await
            .unwrap()
            .stored_chunks,
        0
    );
    h.stop().await;
}

/// The whole-object hash is computed as chunks come; an upload whose
/// chunks did not all come through one media process (a restart, or
/// another process of the queue group) is hashed by reading it back, with
/// the same verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_finished_by_another_media_process_is_verified_all_the_same() {
    let mut h = Harness::start(config()).await;
    let conversation = h.conversation("alice", &["bob"]).await;
    // Three chunks each.
    let good = ciphertext(2 * CHUNK as usize + 10, 5);
    let good_start = start_of(&conversation, &good);
    let bad = ciphertext(2 * CHUNK as usize + 10, 6);
    let bad_start = MediaUploadStart {
        sha256: sha(b"not this"),
        ..start_of(&conversation, &bad)
    };
    for (start, data) in [(&good_start, &good), (&bad_start, &bad)] {
        h.begin("alice", start).await.unwrap();
        h.put("alice", &start.media_id, data, 0).await.unwrap();
    }

    // Another media process takes over.
    let restarted = Media::start(
        config(),
        Arc::new(h.store.clone()),
        h.bus.clone(),
        h.subjects.clone(),
        h.clock.clone(),
    )
    .await
    .unwrap();
    std::mem::replace(&mut h.media, restarted).stop().await;

    for index in 1..3 {
        h.put("alice", &good_start.media_id, &good, index)
            .await
            .unwrap();
    }
    assert!(
        h.status("alice", &good_start.media_id)
            .await
            .unwrap()
            .complete
    );
    assert_eq!(h.download("bob", &good_start.media_id).await.unwrap(), good);

    h.put("alice", &bad_start.media_id, &bad, 1).await.unwrap();
    let e = assert_code(
        h.put("alice", &bad_start.media_id, &bad, 2).await,
        Code::InvalidArgument,
    );
    assert!(e.message.contains("SHA-256"), "{}", e.message);
    assert!(
        h.store
            .get_object(&bad_start.media_id)
            .await
            .unwrap()
            .is_none()
    );
    h.stop().await;
}
