//! The request/reply handlers of `chappe.rpc.media.*`, the sweeper's work,
//! and the routes that serve them on the bus.
//!
//! Who may do what:
//! - **upload** (`begin`, `put_chunk`, `status`): only the owner, the user
//!   who began the upload; to anyone else an object does not exist
//!   (`NOT_FOUND`). `begin` also needs the owner to be a member of the
//!   conversation the media is posted in;
//! - **download** (`open`, `get_chunk`): a member of at least one
//!   conversation the object was posted in (fanout answers, and the answer
//!   is remembered for `access_cache_ttl`), once the object is complete.
//!
//! An object past its `expires_at_ms` does not exist for anyone, whether or
//! not the sweeper deleted it yet.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::sync::Arc;

use chappe_bus::rpc::{self, Server};
use chappe_bus::subjects::{FanoutMethod, MEDIA_GROUP, MediaMethod};
use chappe_bus::{Bus, RpcError, Subjects};
use chappe_proto::ids::{ConversationId, UserId};
use chappe_proto::internal;
use chappe_proto::v1;
use chappe_storage::{CreateMedia, MediaChunkRow, MediaRepo, PutChunk, StoredMedia};
use sha2::{Digest as _, Sha256};

use crate::access::AccessCache;
use crate::clock::Clock;
use crate::config::{MediaConfig, ms};
use crate::convert::{self, Actor, MediaId, SHA256_LEN, Start};
use crate::error::{Error, Result};

/// Conversations asked about in one membership question to fanout.
const MEMBERSHIP_BATCH: usize = 100;

/// Locks that order one user's begins (striped, so memory stays fixed
/// whatever the number of users): a quota is checked and spent under it, so
/// that concurrent begins of one user in this process cannot both spend
/// the same room.
const BEGIN_STRIPES: usize = 256;

/// media's state shared by every handler.
pub struct Service {
    config: MediaConfig,
    store: Arc<dyn MediaRepo>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    clock: Arc<dyn Clock>,
    access: AccessCache,
    begin_order: Vec<tokio::sync::Mutex<()>>,
    running: RunningHashes,
}

/// Uploads whose whole-ciphertext hash this process computes as their
/// chunks are stored, so that the last chunk does not read the whole object
/// back (for 2 GiB, seconds under the gateway's call timeout). Best effort:
/// an upload whose chunks went partly to another media process, or that
/// outlived this one, is hashed by reading it back instead.
#[derive(Default)]
struct RunningHashes {
    uploads: std::sync::Mutex<std::collections::HashMap<String, (u32, Sha256)>>,
}

/// Uploads hashed as they go at once; more are hashed at the end.
const MAX_RUNNING_HASHES: usize = 4_096;

impl RunningHashes {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u32, Sha256)>> {
        self.uploads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunk `index` of `id` was just stored with `data`.
    fn stored(&self, id: &str, index: u32, data: &[u8]) {
        let mut uploads = self.lock();
        if index == 0 {
            if uploads.len() >= MAX_RUNNING_HASHES && !uploads.contains_key(id) {
                return;
            }
            let mut hasher = Sha256::new();
            hasher.update(data);
            uploads.insert(id.to_owned(), (1, hasher));
        } else if let Some((next, hasher)) = uploads.get_mut(id)
            && *next == index
        {
            hasher.update(data);
            *next += 1;
        }
    }

    /// The hash of `id`'s first `count` chunks, if they all went through
    /// here in order; forgets `id` either way.
    fn take(&self, id: &str, count: u32) -> Option<Vec<u8>> {
        let (next, hasher) = self.lock().remove(id)?;
        (next == count).then(|| hasher.finalize().to_vec())
    }
}

/// An `rpc::Server` with one route per [`MediaMethod`], in queue group
/// [`MEDIA_GROUP`].
pub fn routes(service: Arc<Service>) -> Server {
    macro_rules! route {
        ($server:expr, $method:ident, $handler:ident) => {{
            let s = service.clone();
            $server.route(service.subjects.media(MediaMethod::$method), move |r| {
                let s = s.clone();
                async move { reply(s.$handler(r).await) }
            })
        }};
    }
    let server = Server::new(
        service.bus.clone(),
        MEDIA_GROUP,
        service.config.max_in_flight,
    );
    let server = route!(server, Begin, begin);
    let server = route!(server, PutChunk, put_chunk);
    let server = route!(server, Status, status);
    let server = route!(server, Open, open);
    route!(server, GetChunk, get_chunk)
}

fn reply<T>(result: Result<T>) -> Result<T, RpcError> {
    result.map_err(|e| {
        if e.is_server_fault() {
            tracing::error!(error = %e, "media request failed");
        }
        RpcError::from(e)
    })
}

impl Service {
    pub fn new(
        config: MediaConfig,
        store: Arc<dyn MediaRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let access = AccessCache::new(ms(config.access_cache_ttl), config.access_cache_capacity);
        Self {
            config,
            store,
            bus,
            subjects,
            clock,
            access,
            begin_order: (0..BEGIN_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            running: RunningHashes::default(),
        }
    }

    /// Opens or resumes an upload; see the module documentation for who
    /// may. A new upload must fit the user's quota; a resumed one (same id,
    /// owner and fields) is not counted again and answers what is stored.
    /// Either way the conversation is recorded as one the media is posted in.
    #[tracing::instrument(skip_all, fields(user, media, size, resumed))]
    pub async fn begin(&self, req: internal::MediaBegin) -> Result<v1::MediaInfo> {
        let actor = Actor::from_wire(req.actor)?;
        let start = Start::from_wire(req.start.ok_or(Error::Missing("start"))?, &self.config)?;
        let span = tracing::Span::current();
        span.record("user", actor.user.as_str());
        span.record("media", start.media_id.as_str());
        span.record("size", start.size);
        if !self
            .member_of_any(&actor.user, &[start.conversation])
            .await?
        {
            return Err(Error::NotMember(start.conversation.to_string()));
        }

        let _turn = self.begin_order[stripe(&actor.user)].lock().await;
        let now = self.clock.now_ms();
        let row = start.to_row(&actor.user, now, &self.config);
        let id = start.media_id.as_str();
        let resumed = match self.store.get_object(id).await? {
            // Expired but not swept yet: gone for everyone, the id is free.
            Some(stored) if stored.object.expires_at_ms <= now => {
                self.delete(id).await?;
                false
            }
            Some(stored) if stored.object.same_upload(&row) => true,
            Some(_) => return Err(Error::IdTaken(id.to_owned())),
            None => false,
        };
        span.record("resumed", resumed);
        if !resumed {
            self.check_quota(&actor.user, start.size, now).await?;
        }
        let stored = match self.store.create_object(&row, start.conversation).await? {
            CreateMedia::Created(stored) => {
                tracing::debug!("upload begun");
                stored
            }
            CreateMedia::Existing(stored) => stored,
            CreateMedia::Conflict => return Err(Error::IdTaken(id.to_owned())),
        };
        // Every chunk stored but not verified (the process stopped between
        // the last chunk and its check): check it now.
        if stored.stored_chunks == stored.object.chunk_count && !stored.object.complete {
            return self
                .complete(&start.media_id, stored)
                .await
                .map(|s| convert::info(&s));
        }
        Ok(convert::info(&stored))
    }

    /// Stores the next chunk of an upload of the actor (or accepts again
    /// one stored already with the same content). The last chunk completes
    /// the object once the whole ciphertext's hash matches the start's;
    /// when it does not, the object is deleted.
    #[tracing::instrument(skip_all, fields(user, media, index))]
    pub async fn put_chunk(&self, req: internal::MediaPutChunk) -> Result<v1::MediaInfo> {
        let actor = Actor::from_wire(req.actor)?;
        let id = MediaId::parse("media_id", req.media_id)?;
        let chunk = req.chunk.ok_or(Error::Missing("chunk"))?;
        let span = tracing::Span::current();
        span.record("user", actor.user.as_str());
        span.record("media", id.as_str());
        span.record("index", chunk.index);
        if chunk.sha256.len() != SHA256_LEN {
            return Err(Error::invalid(
                "chunk.sha256",
                format!(
                    "a SHA-256 is {SHA256_LEN} bytes, not {}",
                    chunk.sha256.len()
                ),
            ));
        }
        let stored = self.own_object(&actor.user, &id).await?;
        let object = &stored.object;
        if chunk.index >= object.chunk_count {
            return Err(Error::invalid(
                "chunk.index",
                format!(
                    "media {id} has {} chunks (0 to {}), not {}",
                    object.chunk_count,
                    object.chunk_count.saturating_sub(1),
                    chunk.index
                ),
            ));
        }
        if chunk.index > stored.stored_chunks {
            return Err(Error::WrongIndex {
                media: id.to_string(),
                index: chunk.index,
                expected: stored.stored_chunks,
            });
        }
        let expected = convert::chunk_len(object, chunk.index);
        if chunk.data.len() as u64 != expected {
            return Err(Error::ChunkLength {
                index: chunk.index,
                len: chunk.data.len(),
                expected,
            });
        }
        if Sha256::digest(&chunk.data).as_slice() != chunk.sha256.as_slice() {
            return Err(Error::ChunkHashMismatch { index: chunk.index });
        }
        let index = chunk.index;
        let row = MediaChunkRow {
            media_id: id.to_string(),
            idx: index,
            sha256: chunk.sha256,
            data: chunk.data,
        };
        // Kept for the running hash only when the store took it.
        let data = row.data.clone();
        let stored_chunks = match self.store.put_chunk(row).await? {
            PutChunk::Stored { stored } => {
                self.running.stored(id.as_str(), index, &data);
                stored
            }
            PutChunk::Unchanged { stored } => stored,
            PutChunk::Conflict { stored } => {
                return Err(Error::ChunkDiffers {
                    media: id.to_string(),
                    index,
                    expected: stored,
                });
            }
            PutChunk::OutOfOrder { stored } => {
                return Err(Error::WrongIndex {
                    media: id.to_string(),
                    index,
                    expected: stored,
                });
            }
            PutChunk::UnknownObject => return Err(Error::NotFound(id.to_string())),
        };
        let stored = StoredMedia {
            stored_chunks,
            ..stored
        };
        if stored_chunks == stored.object.chunk_count && !stored.object.complete {
            let stored = self.complete(&id, stored).await?;
            return Ok(convert::info(&stored));
        }
        Ok(convert::info(&stored))
    }

    /// What is stored of an upload of the actor.
    #[tracing::instrument(skip_all, fields(user, media))]
    pub async fn status(&self, req: internal::MediaStatus) -> Result<v1::MediaInfo> {
        let actor = Actor::from_wire(req.actor)?;
        let id = MediaId::parse("media_id", req.media_id)?;
        let span = tracing::Span::current();
        span.record("user", actor.user.as_str());
        span.record("media", id.as_str());
        let stored = self.own_object(&actor.user, &id).await?;
        Ok(convert::info(&stored))
    }

    /// The description of a complete object the actor may download.
    #[tracing::instrument(skip_all, fields(user, media))]
    pub async fn open(&self, req: internal::MediaOpen) -> Result<v1::MediaInfo> {
        let actor = Actor::from_wire(req.actor)?;
        let id = MediaId::parse("media_id", req.media_id)?;
        let span = tracing::Span::current();
        span.record("user", actor.user.as_str());
        span.record("media", id.as_str());
        let stored = self.downloadable(&actor.user, &id).await?;
        Ok(convert::info(&stored))
    }

    /// One chunk of a complete object the actor may download.
    #[tracing::instrument(skip_all, fields(user, media, index))]
    pub async fn get_chunk(&self, req: internal::MediaGetChunk) -> Result<v1::MediaChunk> {
        let actor = Actor::from_wire(req.actor)?;
        let id = MediaId::parse("media_id", req.media_id)?;
        let span = tracing::Span::current();
        span.record("user", actor.user.as_str());
        span.record("media", id.as_str());
        span.record("index", req.index);
        let stored = self.downloadable(&actor.user, &id).await?;
        if req.index >= stored.object.chunk_count {
            return Err(Error::PastEnd {
                media: id.to_string(),
                index: req.index,
                chunk_count: stored.object.chunk_count,
            });
        }
        // Deleted since it was read (expired, swept): gone.
        let chunk = self
            .store
            .get_chunk(id.as_str(), req.index)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        Ok(v1::MediaChunk {
            index: chunk.idx,
            data: chunk.data,
            sha256: chunk.sha256,
        })
    }

    /// Deletes every object past its retention, `sweep_batch` objects per
    /// store transaction; returns how many.
    pub async fn sweep(&self) -> Result<u64> {
        let now = self.clock.now_ms();
        let batch = self.config.sweep_batch.max(1);
        let mut total = 0;
        loop {
            let deleted = self.store.delete_expired(now, batch).await?;
            total += deleted;
            if deleted < batch as u64 {
                break;
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "expired media deleted");
        }
        Ok(total)
    }

    /// The object, if it exists, has not expired and `user` owns it;
    /// `NOT_FOUND` otherwise, whichever the reason.
    async fn own_object(&self, user: &UserId, id: &MediaId) -> Result<StoredMedia> {
        let stored = self.live_object(id).await?;
        if stored.object.owner_user_id != user.as_str() {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(stored)
    }

    /// The object, if it exists and has not expired.
    async fn live_object(&self, id: &MediaId) -> Result<StoredMedia> {
        match self.store.get_object(id.as_str()).await? {
            Some(stored) if stored.object.expires_at_ms > self.clock.now_ms() => Ok(stored),
            _ => Err(Error::NotFound(id.to_string())),
        }
    }

    /// The object, if `user` may download it now: it exists, has not
    /// expired, `user` is a member of a conversation it was posted in, and
    /// it is complete.
    async fn downloadable(&self, user: &UserId, id: &MediaId) -> Result<StoredMedia> {
        let stored = self.live_object(id).await?;
        let now = self.clock.now_ms();
        if !self.access.allowed(user.as_str(), id.as_str(), now) {
            let posts = self.store.posts(id.as_str()).await?;
            if !self.member_of_any(user, &posts).await? {
                return Err(Error::NoAccess(id.to_string()));
            }
            self.access.grant(user.as_str(), id.as_str(), now);
        }
        if !stored.object.complete {
            return Err(Error::Incomplete {
                media: id.to_string(),
                stored: stored.stored_chunks,
                chunk_count: stored.object.chunk_count,
            });
        }
        Ok(stored)
    }

    /// Whether `user` is a member of at least one of `conversations`, as
    /// fanout says (conversations it does not know count as not).
    async fn member_of_any(&self, user: &UserId, conversations: &[ConversationId]) -> Result<bool> {
        let subject = self.subjects.fanout(FanoutMethod::Memberships);
        for batch in conversations.chunks(MEMBERSHIP_BATCH) {
            let asked: Vec<String> = batch.iter().map(ToString::to_string).collect();
            let request = internal::MembershipsRequest {
                user_id: user.to_string(),
                conversation_ids: asked.clone(),
            };
            let answer: internal::MembershipsResponse =
                rpc::call(&*self.bus, &subject, &request, self.config.fanout_timeout)
                    .await
                    .map_err(Error::Fanout)?;
            // Only what was asked counts, whatever else an answer holds.
            if answer
                .conversations
                .iter()
                .any(|c| asked.contains(&c.conversation_id))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Refuses an upload of `size` bytes that would take `user` over the
    /// quota: the sizes of the objects they created within the window
    /// before `now` (rolling) plus `size`. The retry-after is when enough
    /// of those roll out of the window for `size` to fit.
    async fn check_quota(&self, user: &UserId, size: u64, now: i64) -> Result<()> {
        let window = ms(self.config.quota_window);
        let quota = self.config.quota_bytes;
        // An object counts while `created_at_ms > now - window`.
        let since = now.saturating_sub(window).saturating_add(1);
        let usage = self.store.usage_since(user.as_str(), since).await?;
        let used: u64 = usage.iter().map(|u| u.size).sum();
        if used.saturating_add(size) <= quota {
            return Ok(());
        }
        // Oldest first: the first time at which what remains plus `size`
        // fits. `size <= max_upload_bytes <= quota`, so one is always
        // found; a whole window is the fallback otherwise.
        let mut remaining = used;
        let mut fits_at = now.saturating_add(window);
        for object in &usage {
            remaining = remaining.saturating_sub(object.size);
            if remaining.saturating_add(size) <= quota {
                fits_at = object.created_at_ms.saturating_add(window);
                break;
            }
        }
        let retry_after_ms = u64::try_from(fits_at.saturating_sub(now))
            .unwrap_or(0)
            .max(1);
        Err(Error::QuotaExceeded {
            used,
            size,
            quota,
            window: self.config.quota_window,
            retry_after: std::time::Duration::from_millis(retry_after_ms),
        })
    }

    /// Every chunk of `stored` is stored: takes the whole ciphertext's hash
    /// computed as the chunks came (or, when they did not all come through
    /// this process in order, reads them back one at a time to compute it),
    /// and marks the object complete
    /// when it matches the start's hash. When it does not, deletes the
    /// object and answers `INVALID_ARGUMENT`.
    async fn complete(&self, id: &MediaId, stored: StoredMedia) -> Result<StoredMedia> {
        let whole = match self.running.take(id.as_str(), stored.object.chunk_count) {
            Some(whole) => whole,
            None => {
                let mut hasher = Sha256::new();
                for idx in 0..stored.object.chunk_count {
                    let chunk = self
                        .store
                        .get_chunk(id.as_str(), idx)
                        .await?
                        // Deleted meanwhile (another request found a mismatch).
                        .ok_or_else(|| Error::NotFound(id.to_string()))?;
                    hasher.update(&chunk.data);
                }
                hasher.finalize().to_vec()
            }
        };
        if whole != stored.object.sha256 {
            tracing::warn!(media = %id, owner = %stored.object.owner_user_id,
                "whole-object hash mismatch; upload discarded");
            self.delete(id.as_str()).await?;
            return Err(Error::ObjectHashMismatch(id.to_string()));
        }
        if !self.store.mark_complete(id.as_str()).await? {
            return Err(Error::NotFound(id.to_string()));
        }
        tracing::info!(media = %id, size = stored.object.size, chunks = stored.object.chunk_count,
            "upload complete");
        let mut stored = stored;
        stored.object.complete = true;
        Ok(stored)
    }

    /// Deletes an object and forgets who could read it.
    async fn delete(&self, id: &str) -> Result<()> {
        self.store.delete_object(id).await?;
        self.access.forget_media(id);
        Ok(())
    }
}

/// The begin stripe of `user`.
fn stripe(user: &UserId) -> usize {
    let mut h = DefaultHasher::new();
    user.hash(&mut h);
    (h.finish() % BEGIN_STRIPES as u64) as usize
}
