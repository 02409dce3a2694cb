//! The media service's tables: objects, chunks, posts, and the lookups by
//! owner (quotas) and by day of expiry (the sweeper).

use async_trait::async_trait;
use chappe_proto::ids::ConversationId;

use super::{CqlStore, Inner, Lwt, backoff, from_i32, from_i64, parse_id, to_i32, to_i64};
use crate::{
    CreateMedia, Error, MediaChunkRow, MediaObjectRow, MediaRepo, MediaUsage, PutChunk, Result,
    StoredMedia,
};

type MediaTuple = (String, String, i64, i32, i32, Vec<u8>, i64, i64, bool);
type ChunkTuple = (String, i32, Vec<u8>, Vec<u8>);

/// Width of a `media_by_expiry` partition.
const DAY_MS: i64 = 24 * 3600 * 1000;
/// The longest TTL CQL accepts (20 years); longer retention means none.
const MAX_TTL_SECS: i64 = 630_720_000;

fn object(t: MediaTuple) -> Result<MediaObjectRow> {
    const T: &str = "media_objects";
    Ok(MediaObjectRow {
        media_id: t.0,
        owner_user_id: t.1,
        size: from_i64(T, "size", t.2)?,
        chunk_size: from_i32(T, "chunk_size", t.3)?,
        chunk_count: from_i32(T, "chunk_count", t.4)?,
        sha256: t.5,
        created_at_ms: t.6,
        expires_at_ms: t.7,
        complete: t.8,
    })
}

fn chunk(t: ChunkTuple) -> Result<MediaChunkRow> {
    Ok(MediaChunkRow {
        media_id: t.0,
        idx: from_i32("media_chunks", "idx", t.1)?,
        sha256: t.2,
        data: t.3,
    })
}

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

impl Inner {
    /// The TTL (seconds) of a row that must outlive `until_ms`: what is left
    /// until then plus the configured grace; 0 (none) beyond CQL's limit.
    fn ttl_until(&self, until_ms: i64) -> i32 {
        let left = until_ms.saturating_sub(chappe_proto::ids::unix_ms()).max(0) / 1000;
        let grace = i64::try_from(self.config.media_ttl_grace.as_secs()).unwrap_or(MAX_TTL_SECS);
        let ttl = left.saturating_add(grace);
        if ttl > MAX_TTL_SECS {
            0
        } else {
            i32::try_from(ttl).unwrap_or(0)
        }
    }

    async fn media_row(&self, media_id: &str, serial: bool) -> Result<Option<MediaObjectRow>> {
        let st = if serial {
            &self.st.media_get_serial
        } else {
            &self.st.media_get
        };
        let row: Option<MediaTuple> = self.first("media_objects", st, (media_id,)).await?;
        row.map(object).transpose()
    }

    /// Chunks are stored in order without gaps: the count is the last
    /// index plus one.
    async fn stored_chunks(&self, media_id: &str) -> Result<u32> {
        let last: Option<(i32,)> = self
            .first("media_chunks", &self.st.chunk_last, (media_id,))
            .await?;
        match last {
            None => Ok(0),
            Some((idx,)) => Ok(from_i32("media_chunks", "idx", idx)?.saturating_add(1)),
        }
    }

    async fn media(&self, media_id: &str, serial: bool) -> Result<Option<StoredMedia>> {
        let (object, stored_chunks) = tokio::try_join!(
            self.media_row(media_id, serial),
            self.stored_chunks(media_id)
        )?;
        Ok(object.map(|object| StoredMedia {
            object,
            stored_chunks,
        }))
    }

    /// The owner and expiry lookups of an object (idempotent).
    async fn put_lookups(&self, o: &MediaObjectRow) -> Result<()> {
        let ttl = self.ttl_until(o.expires_at_ms);
        let size = to_i64("media_by_owner", "size", o.size)?;
        let day = day_of(o.expires_at_ms);
        let day_ttl = self.ttl_until(day.saturating_add(1).saturating_mul(DAY_MS));
        tokio::try_join!(
            self.write(
                "media_by_owner",
                &self.st.owner_put,
                (
                    o.owner_user_id.as_str(),
                    o.created_at_ms,
                    o.media_id.as_str(),
                    size,
                    ttl
                ),
            ),
            self.write(
                "media_by_expiry",
                &self.st.expiry_put,
                (day, o.expires_at_ms, o.media_id.as_str(), ttl),
            ),
            self.write("media_expiry_days", &self.st.expiry_day_put, (day, day_ttl)),
        )?;
        Ok(())
    }

    async fn put_post(&self, o: &MediaObjectRow, conversation: ConversationId) -> Result<()> {
        self.write(
            "media_posts",
            &self.st.post_put,
            (
                o.media_id.as_str(),
                conversation.to_string(),
                self.ttl_until(o.expires_at_ms),
            ),
        )
        .await
    }

    /// Deletes an object (by LWT: of concurrent deleters one counts it),
    /// then its chunks, posts and lookups. True if this call deleted it.
    async fn delete_media(&self, o: &MediaObjectRow) -> Result<bool> {
        let id = o.media_id.as_str();
        let deleted = match self
            .lwt("media_objects", &self.st.media_delete, (id,))
            .await?
        {
            Lwt::Applied => true,
            Lwt::NotApplied => false,
            Lwt::Unknown(e) => match self.media_row(id, true).await? {
                None => true,
                Some(_) => return Err(e),
            },
        };
        tokio::try_join!(
            self.write("media_chunks", &self.st.chunks_delete, (id,)),
            self.write("media_posts", &self.st.posts_delete, (id,)),
            self.write(
                "media_by_owner",
                &self.st.owner_delete,
                (o.owner_user_id.as_str(), o.created_at_ms, id),
            ),
            self.write(
                "media_by_expiry",
                &self.st.expiry_delete,
                (day_of(o.expires_at_ms), o.expires_at_ms, id),
            ),
        )?;
        Ok(deleted)
    }
}

#[async_trait]
impl MediaRepo for CqlStore {
    async fn create_object(
        &self,
        row: &MediaObjectRow,
        conversation: ConversationId,
    ) -> Result<CreateMedia> {
        const T: &str = "media_objects";
        let inner = &self.inner;
        for round in 0..inner.config.lwt_attempts {
            let outcome = inner
                .lwt(
                    T,
                    &inner.st.media_insert,
                    (
                        row.media_id.as_str(),
                        row.owner_user_id.as_str(),
                        to_i64(T, "size", row.size)?,
                        to_i32(T, "chunk_size", row.chunk_size)?,
                        to_i32(T, "chunk_count", row.chunk_count)?,
                        row.sha256.as_slice(),
                        row.created_at_ms,
                        row.expires_at_ms,
                        row.complete,
                        inner.ttl_until(row.expires_at_ms),
                    ),
                )
                .await?;
            // Past this match, this call took the id.
            match outcome {
                Lwt::Applied => {}
                Lwt::NotApplied | Lwt::Unknown(_) => {
                    match inner.media(&row.media_id, true).await? {
                        None => {
                            if let Lwt::Unknown(e) = outcome {
                                return Err(e);
                            }
                            // Deleted in between: take the id again.
                            backoff(round).await;
                            continue;
                        }
                        Some(stored) if !stored.object.same_upload(row) => {
                            return Ok(CreateMedia::Conflict);
                        }
                        Some(stored) => {
                            let ours = matches!(outcome, Lwt::Unknown(_))
                                && stored.object == *row
                                && stored.stored_chunks == 0;
                            if !ours {
                                // The same upload again: make sure its lookups
                                // exist (its first call may have stopped early).
                                inner.put_lookups(&stored.object).await?;
                                inner.put_post(&stored.object, conversation).await?;
                                return Ok(CreateMedia::Existing(stored));
                            }
                        }
                    }
                }
            }
            inner.put_lookups(row).await?;
            inner.put_post(row, conversation).await?;
            return Ok(CreateMedia::Created(StoredMedia {
                object: row.clone(),
                stored_chunks: 0,
            }));
        }
        Err(Error::Unavailable(format!(
            "media_objects: {} kept being deleted while created",
            row.media_id
        )))
    }

    async fn get_object(&self, media_id: &str) -> Result<Option<StoredMedia>> {
        self.inner.media(media_id, false).await
    }

    async fn put_chunk(&self, chunk: MediaChunkRow) -> Result<PutChunk> {
        const T: &str = "media_chunks";
        let inner = &self.inner;
        let Some(object) = inner.media_row(&chunk.media_id, false).await? else {
            return Ok(PutChunk::UnknownObject);
        };
        let stored = inner.stored_chunks(&chunk.media_id).await?;
        let idx = to_i32(T, "idx", chunk.idx)?;
        let stored_hash = |serial: bool| {
            let st = if serial {
                &inner.st.chunk_hash_serial
            } else {
                &inner.st.chunk_hash
            };
            inner.first::<(Vec<u8>,)>(T, st, (chunk.media_id.as_str(), idx))
        };
        if chunk.idx < stored {
            return Ok(match stored_hash(false).await? {
                Some((hash,)) if hash == chunk.sha256 => PutChunk::Unchanged { stored },
                Some(_) => PutChunk::Conflict { stored },
                None => {
                    return Err(super::corrupt(
                        T,
                        format!(
                            "chunk {} of {} is missing below {stored} stored",
                            chunk.idx, chunk.media_id
                        ),
                    ));
                }
            });
        }
        if chunk.idx != stored || chunk.idx >= object.chunk_count {
            return Ok(PutChunk::OutOfOrder { stored });
        }
        let outcome = inner
            .lwt(
                T,
                &inner.st.chunk_insert,
                (
                    chunk.media_id.as_str(),
                    idx,
                    chunk.sha256.as_slice(),
                    chunk.data.as_slice(),
                    inner.ttl_until(object.expires_at_ms),
                ),
            )
            .await?;
        let next = stored + 1;
        match outcome {
            Lwt::Applied => Ok(PutChunk::Stored { stored: next }),
            Lwt::NotApplied | Lwt::Unknown(_) => match stored_hash(true).await? {
                // An unknown outcome with our hash there: most likely ours.
                Some((hash,)) if hash == chunk.sha256 => Ok(match outcome {
                    Lwt::Unknown(_) => PutChunk::Stored { stored: next },
                    _ => PutChunk::Unchanged { stored: next },
                }),
                Some(_) => Ok(PutChunk::Conflict { stored: next }),
                None => match outcome {
                    Lwt::Unknown(e) => Err(e),
                    _ => Err(Error::Unavailable(format!(
                        "{T}: chunk {} of {} was neither stored nor found",
                        chunk.idx, chunk.media_id
                    ))),
                },
            },
        }
    }

    async fn get_chunk(&self, media_id: &str, idx: u32) -> Result<Option<MediaChunkRow>> {
        let Ok(idx) = i32::try_from(idx) else {
            return Ok(None);
        };
        let row: Option<ChunkTuple> = self
            .inner
            .first("media_chunks", &self.inner.st.chunk_get, (media_id, idx))
            .await?;
        row.map(chunk).transpose()
    }

    async fn mark_complete(&self, media_id: &str) -> Result<bool> {
        let inner = &self.inner;
        let Some(stored) = inner.media(media_id, false).await? else {
            return Ok(false);
        };
        if stored.stored_chunks < stored.object.chunk_count {
            return Ok(false);
        }
        let ttl = inner.ttl_until(stored.object.expires_at_ms);
        match inner
            .lwt("media_objects", &inner.st.media_complete, (ttl, media_id))
            .await?
        {
            Lwt::Applied => Ok(true),
            Lwt::NotApplied => Ok(false),
            Lwt::Unknown(e) => match inner.media_row(media_id, true).await? {
                Some(o) if o.complete => Ok(true),
                Some(_) => Err(e),
                None => Ok(false),
            },
        }
    }

    async fn add_post(&self, media_id: &str, conversation: ConversationId) -> Result<bool> {
        let Some(object) = self.inner.media_row(media_id, false).await? else {
            return Ok(false);
        };
        self.inner.put_post(&object, conversation).await?;
        Ok(true)
    }

    async fn posts(&self, media_id: &str) -> Result<Vec<ConversationId>> {
        let rows: Vec<(String,)> = self
            .inner
            .all("media_posts", &self.inner.st.posts_list, (media_id,))
            .await?;
        rows.into_iter()
            .map(|(c,)| parse_id("media_posts", &c, ConversationId::parse))
            .collect()
    }

    async fn usage_since(&self, owner_user_id: &str, since_ms: i64) -> Result<Vec<MediaUsage>> {
        let rows: Vec<(String, i64, i64)> = self
            .inner
            .all(
                "media_by_owner",
                &self.inner.st.owner_since,
                (owner_user_id, since_ms),
            )
            .await?;
        rows.into_iter()
            .map(|(media_id, created_at_ms, size)| {
                Ok(MediaUsage {
                    media_id,
                    created_at_ms,
                    size: from_i64("media_by_owner", "size", size)?,
                })
            })
            .collect()
    }

    /// Walks the days of expiry up to `now_ms`, soonest first, deleting
    /// each object whose expiry has come (an entry whose object is gone or
    /// was re-created with another expiry is only removed).
    async fn delete_expired(&self, now_ms: i64, limit: usize) -> Result<u64> {
        let inner = &self.inner;
        if limit == 0 {
            return Ok(0);
        }
        let today = day_of(now_ms);
        let days: Vec<(i64,)> = inner
            .all("media_expiry_days", &inner.st.expiry_days, (today,))
            .await?;
        let mut deleted = 0usize;
        for (day,) in days {
            loop {
                let wanted = limit - deleted;
                let entries: Vec<(i64, String)> = inner
                    .up_to(
                        "media_by_expiry",
                        &inner.st.expiry_in_day,
                        (day, now_ms, i32::try_from(wanted).unwrap_or(i32::MAX)),
                        wanted,
                    )
                    .await?;
                if entries.is_empty() {
                    break;
                }
                for (expires_at_ms, media_id) in entries {
                    let object = inner.media_row(&media_id, false).await?;
                    if let Some(o) = object.filter(|o| o.expires_at_ms <= now_ms)
                        && inner.delete_media(&o).await?
                    {
                        deleted += 1;
                    }
                    inner
                        .write(
                            "media_by_expiry",
                            &inner.st.expiry_delete,
                            (day, expires_at_ms, media_id.as_str()),
                        )
                        .await?;
                }
                if deleted >= limit {
                    return Ok(deleted as u64);
                }
            }
            if day < today {
                let left: Option<(String,)> = inner
                    .first("media_by_expiry", &inner.st.expiry_any_in_day, (day,))
                    .await?;
                if left.is_none() {
                    inner
                        .write("media_expiry_days", &inner.st.expiry_day_delete, (day,))
                        .await?;
                }
            }
        }
        Ok(deleted as u64)
    }

    async fn delete_object(&self, media_id: &str) -> Result<bool> {
        let Some(object) = self.inner.media_row(media_id, false).await? else {
            return Ok(false);
        };
        self.inner.delete_media(&object).await
    }
}
