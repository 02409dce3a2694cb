//! Files: encrypted upload with resume, and verified download, over the
//! gateway's `Media` service. The cipher and its format are in
//! [`crate::media`].
//!
//! An upload reads the file twice, one chunk at a time: a first pass seals
//! it to learn each ciphertext chunk's hash and the whole ciphertext's
//! (declared when the upload starts), a second seals and sends it. Before
//! anything leaves, the upload's media id and key are persisted in the
//! device's encrypted state under its upload id, so that a cut connection
//! (retried here, resuming where `Media.Status` says the server stopped)
//! or a restart (the next `send_file` with the same upload id) continues
//! the same upload without resending stored chunks. The record goes once
//! the message carrying the file is sent.
//!
//! A download writes authenticated plaintext, chunk by chunk, to a hidden
//! temporary file beside the destination, resumes from the next chunk on a
//! transient failure, and renames the file into place only once every chunk
//! and the whole ciphertext's hash verified.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use chappe_proto::ids::ConversationId;
use chappe_proto::v1::{self as pb, download_frame, upload_frame};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;

use super::{Client, Inner};
use crate::media::{
    self, Attachment, ChunkCipher, Layout, MediaError, MediaKey, Opener, Progress, Scan, Sealer,
    SendFileOptions, SentFile,
};
use crate::state::UploadRecord;
use crate::{Error, Result};

/// Sealed chunks queued ahead of the network: an upload holds at most this
/// many chunks (plus the one being sealed) in memory.
const UPLOAD_PIPELINE: usize = 4;

/// Longest upload id, in bytes.
const MAX_UPLOAD_ID_BYTES: usize = 4096;

/// One upload, as this call runs it.
struct UploadJob {
    upload_id: String,
    conversation: ConversationId,
    path: PathBuf,
    name: String,
    media_id: String,
    key: MediaKey,
    layout: Layout,
    scan: Arc<Scan>,
}

/// How one attempt of the `Upload` stream ended.
enum Attempt {
    /// The server holds the whole object and its hash matched.
    Complete,
    /// The caller asked to stop after some chunks.
    Stopped,
    /// The stream ended before the last chunk was stored.
    Incomplete,
}

/// How the chunk producer of one attempt ended.
enum Produced {
    All,
    Stopped,
    /// The call ended before every chunk was taken.
    Closed,
}

/// Marks an upload id as running in this process for as long as it lives.
struct ActiveUpload<'a> {
    inner: &'a Inner,
    upload_id: String,
}

impl<'a> ActiveUpload<'a> {
    fn claim(inner: &'a Inner, upload_id: &str) -> Result<Self> {
        let mut active = inner
            .active_uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !active.insert(upload_id.to_owned()) {
            return Err(Error::InvalidInput(format!(
                "upload {upload_id:?} is already running"
            )));
        }
        Ok(ActiveUpload {
            inner,
            upload_id: upload_id.to_owned(),
        })
    }
}

impl Drop for ActiveUpload<'_> {
    fn drop(&mut self) {
        self.inner
            .active_uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.upload_id);
    }
}

/// Whether an upload or download attempt may succeed if made again
/// (resuming where the server is): transport failures, broken streams,
/// `UNAVAILABLE`, and `RESOURCE_EXHAUSTED` with a retry-after no longer
/// than `max_wait`.
fn transient(e: &Error, max_wait: Duration) -> bool {
    match e {
        Error::Transport(_) | Error::Timeout(_) | Error::Disconnected => true,
        Error::Media(MediaError::Truncated { .. }) => true,
        Error::Status {
            code, retry_after, ..
        } => match code {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::DeadlineExceeded => true,
            tonic::Code::ResourceExhausted => retry_after.is_some_and(|d| d <= max_wait),
            _ => false,
        },
        _ => false,
    }
}

/// Whether the server refused the upload itself, so that resuming it can
/// never work: the next attempt starts afresh under a new id.
fn refused_for_good(e: &Error) -> bool {
    match e {
        Error::Media(MediaError::InfoMismatch { .. }) => true,
        Error::Status { code, .. } => matches!(
            code,
            tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::AlreadyExists
                | tonic::Code::DataLoss
                | tonic::Code::OutOfRange
        ),
        _ => false,
    }
}

fn join_error(path: &Path, e: tokio::task::JoinError) -> Error {
    Error::io(path, std::io::Error::other(e))
}

/// Seals the whole file once, keeping only the hashes.
async fn scan_file(path: &Path, layout: Layout, key: &MediaKey, media_id: &str) -> Result<Scan> {
    let cipher = ChunkCipher::new(key, media_id)?;
    let owned = path.to_owned();
    let scanned = tokio::task::spawn_blocking(move || {
        let file = File::open(&owned)?;
        media::scan(file, layout, cipher)
    })
    .await
    .map_err(|e| join_error(path, e))?;
    match scanned {
        Ok(scan) => Ok(scan),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(MediaError::FileChanged("the file got shorter while it was read".into()).into())
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// What one attempt's chunk producer sends.
struct Chunks {
    path: PathBuf,
    layout: Layout,
    cipher: ChunkCipher,
    /// The first pass's hashes, which every chunk must match.
    scan: Arc<Scan>,
    /// The first chunk to send.
    from: u32,
    /// Send at most this many.
    budget: Option<u32>,
}

/// Reads, seals and queues chunks `from..` of an upload (at most `budget`
/// of them), checking each against the first pass's hash. Reports each
/// chunk taken on `done`.
async fn produce(
    chunks: Chunks,
    tx: mpsc::Sender<pb::UploadFrame>,
    done: mpsc::UnboundedSender<u32>,
) -> Result<Produced> {
    let Chunks {
        path,
        layout,
        cipher,
        scan,
        from,
        budget,
    } = chunks;
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Sealer<File>> {
            let mut sealer = Sealer::new(File::open(&path)?, layout, cipher);
            sealer.seek_to(from)?;
            Ok(sealer)
        })
    }
    .await
    .map_err(|e| join_error(&path, e))?;
    let mut sealer = opened.map_err(|e| Error::io(&path, e))?;
    let mut sent = 0u32;
    loop {
        if budget.is_some_and(|b| sent >= b) {
            return Ok(Produced::Stopped);
        }
        let (back, next) = tokio::task::spawn_blocking(move || {
            let next = sealer.next_chunk();
            (sealer, next)
        })
        .await
        .map_err(|e| join_error(&path, e))?;
        sealer = back;
        let chunk = match next {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(Produced::All),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(MediaError::FileChanged(
                    "the file got shorter since its upload started".into(),
                )
                .into());
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        // The same key and nonce must never seal two plaintexts on the wire.
        if scan.chunk_hashes.get(chunk.index as usize) != Some(&chunk.sha256) {
            return Err(MediaError::FileChanged(format!(
                "chunk {} differs from the first reading",
                chunk.index
            ))
            .into());
        }
        let index = chunk.index;
        let frame = pb::UploadFrame {
            body: Some(upload_frame::Body::Chunk(pb::MediaChunk {
                index,
                data: chunk.data,
                sha256: chunk.sha256.to_vec(),
            })),
        };
        if tx.send(frame).await.is_err() {
            return Ok(Produced::Closed);
        }
        sent += 1;
        let _ = done.send(index);
    }
}

/// The hidden temporary file a download writes, removed unless committed.
struct PartFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
}

impl PartFile {
    async fn create(dest: &Path) -> Result<PartFile> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::InvalidInput(format!("{} names no file", dest.display())))?;
        if tokio::fs::metadata(dest).await.is_ok_and(|m| m.is_dir()) {
            return Err(Error::InvalidInput(format!(
                "{} is a directory",
                dest.display()
            )));
        }
        let path = dest.with_file_name(format!(
            ".{}.{:016x}.part",
            name.to_string_lossy(),
            rand::random::<u64>()
        ));
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        let file = options.open(&path).await.map_err(|e| Error::io(&path, e))?;
        Ok(PartFile {
            path,
            file: Some(file),
        })
    }

    fn file(&mut self) -> Result<&mut tokio::fs::File> {
        let path = &self.path;
        self.file
            .as_mut()
            .ok_or_else(|| Error::io(path, std::io::Error::other("file already closed")))
    }

    /// Syncs the file and renames it to `dest`.
    async fn commit(mut self, dest: &Path) -> Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::io(&self.path, std::io::Error::other("file already closed")))?;
        file.flush().await.map_err(|e| Error::io(&self.path, e))?;
        file.sync_all()
            .await
            .map_err(|e| Error::io(&self.path, e))?;
        drop(file);
        tokio::fs::rename(&self.path, dest)
            .await
            .map_err(|e| Error::io(dest, e))?;
        // Renamed: nothing left to remove.
        self.path = PathBuf::new();
        #[cfg(unix)]
        if let Some(dir) = dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let owned = dir.to_owned();
            tokio::task::spawn_blocking(move || File::open(&owned).and_then(|d| d.sync_all()))
                .await
                .map_err(|e| join_error(dir, e))?
                .map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The retries of one media transfer: one re-login when the session token
/// is refused, and up to `media_attempts` attempts after transient
/// failures, waiting the server's retry-after or a doubling backoff.
struct Retries {
    attempt: u32,
    relogged: bool,
    delay: std::time::Duration,
    max_delay: std::time::Duration,
    max_attempts: u32,
    request_timeout: std::time::Duration,
}

impl Retries {
    fn new(config: &crate::ClientConfig) -> Self {
        Self {
            attempt: 1,
            relogged: false,
            delay: config.reconnect_backoff_min,
            max_delay: config.reconnect_backoff_max,
            max_attempts: config.media_attempts,
            request_timeout: config.request_timeout,
        }
    }

    /// After a failed attempt with `error`: `Ok` to go again (having
    /// logged in again or waited), or the error to give up with.
    async fn after(
        &mut self,
        client: &Client,
        error: Error,
        used_token: Option<String>,
        media: &str,
        what: &str,
    ) -> Result<()> {
        if error.code() == Some(tonic::Code::Unauthenticated) && !self.relogged {
            self.relogged = true;
            return client.inner.rpc.relogin(used_token).await;
        }
        if transient(&error, self.request_timeout) && self.attempt < self.max_attempts {
            let wait = error.retry_after().unwrap_or(self.delay);
            tracing::warn!(attempt = self.attempt, error = %error, ?wait, %media, "{what} interrupted; resuming");
            sleep(wait).await;
            self.delay = (self.delay * 2).min(self.max_delay);
            self.attempt += 1;
            return Ok(());
        }
        Err(error)
    }
}

impl Client {
    // ------------------------------------------------------------- upload

    /// Encrypts the file at `path`, uploads it and sends it to
    /// `conversation` as a file message; returns the receipt and what the
    /// upload did. `progress` is called as chunks go (from this task).
    ///
    /// The file is read chunk by chunk, never whole (see [`crate::media`]).
    /// A cut connection or `UNAVAILABLE` is retried up to
    /// [`ClientConfig::media_attempts`](crate::ClientConfig::media_attempts)
    /// times, each attempt resuming after the chunks the server holds. If
    /// the upload still fails, sending the same file to the same
    /// conversation again (in this process or after a restart) resumes it;
    /// see [`Client::send_file_with`] for naming uploads.
    pub async fn send_file(
        &self,
        conversation: &ConversationId,
        path: &Path,
        progress: impl Fn(Progress),
    ) -> Result<SentFile> {
        self.send_file_with(conversation, path, SendFileOptions::default(), progress)
            .await
    }

    /// [`Client::send_file`] with options: an explicit upload id (to resume
    /// by name) and a deterministic interruption for tests.
    pub async fn send_file_with(
        &self,
        conversation: &ConversationId,
        path: &Path,
        options: SendFileOptions,
        progress: impl Fn(Progress),
    ) -> Result<SentFile> {
        let path = tokio::fs::canonicalize(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidInput(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::InvalidInput(format!("{} names no file", path.display())))?;
        let upload_id = options
            .upload_id
            .clone()
            .unwrap_or_else(|| format!("{conversation} {}", path.display()));
        if upload_id.is_empty() || upload_id.len() > MAX_UPLOAD_ID_BYTES {
            return Err(Error::InvalidInput(format!(
                "an upload id must be 1 to {MAX_UPLOAD_ID_BYTES} bytes"
            )));
        }
        let _active = ActiveUpload::claim(&self.inner, &upload_id)?;
        let chunk_bytes = u32::try_from(self.inner.config.media_chunk_bytes)
            .map_err(|_| Error::Config("media_chunk_bytes is too large".into()))?;
        let layout = Layout::new(meta.len(), chunk_bytes)?;
        let job = self
            .prepare_upload(upload_id, *conversation, path, name, layout)
            .await?;
        let (chunks_sent, chunks_skipped) = match self
            .upload(&job, options.stop_after_chunks, &progress)
            .await
        {
            Ok(stats) => stats,
            Err(e) => {
                if refused_for_good(&e) {
                    tracing::warn!(upload = %job.upload_id, error = %e, "upload refused; the next one starts afresh");
                    self.forget_upload(&job.upload_id).await?;
                }
                return Err(e);
            }
        };
        let attachment = Attachment::new(
            job.media_id.clone(),
            job.name.clone(),
            job.layout,
            job.key.clone(),
            job.scan.sha256,
        )?;
        let sent = self
            .send_encrypted(conversation, |machine| {
                machine.encrypt_file(conversation, &attachment, chappe_proto::ids::unix_ms())
            })
            .await?;
        self.forget_upload(&job.upload_id).await?;
        Ok(SentFile {
            sent,
            media_id: job.media_id.clone(),
            attachment,
            chunks_sent,
            chunks_skipped,
        })
    }

    /// The ids of uploads started and not finished (kept in the device's
    /// state to resume them).
    pub async fn pending_uploads(&self) -> Vec<String> {
        self.inner
            .local
            .lock()
            .await
            .uploads
            .keys()
            .cloned()
            .collect()
    }

    /// Forgets an unfinished upload: sending the file again starts afresh
    /// (what the server stored expires there).
    pub async fn forget_upload(&self, upload_id: &str) -> Result<()> {
        let mut local = self.inner.local.lock().await;
        if local.uploads.remove(upload_id).is_some() {
            self.persist(&local).await?;
        }
        Ok(())
    }

    /// Resumes the upload recorded under `upload_id` if the file still
    /// seals to the same ciphertext, or records a new one (persisted before
    /// anything leaves).
    async fn prepare_upload(
        &self,
        upload_id: String,
        conversation: ConversationId,
        path: PathBuf,
        name: String,
        layout: Layout,
    ) -> Result<UploadJob> {
        let existing = self
            .inner
            .local
            .lock()
            .await
            .uploads
            .get(&upload_id)
            .cloned();
        if let Some(record) = existing {
            if record.conversation_id != conversation.to_string() {
                return Err(Error::InvalidInput(format!(
                    "upload {upload_id:?} belongs to conversation {}",
                    record.conversation_id
                )));
            }
            let key = MediaKey::from_base64(&record.key)
                .map_err(|e| Error::CorruptState(format!("upload {upload_id:?}: {e}")))?;
            if record.size == layout.size() && record.chunk_bytes == layout.chunk_bytes() {
                let scan = scan_file(&path, layout, &key, &record.media_id).await?;
                if media::decode_b64(&record.sha256).ok().as_deref() == Some(&scan.sha256[..]) {
                    tracing::debug!(upload = %upload_id, media = %record.media_id, "resuming upload");
                    return Ok(UploadJob {
                        upload_id,
                        conversation,
                        path,
                        name,
                        media_id: record.media_id.clone(),
                        key,
                        layout,
                        scan: Arc::new(scan),
                    });
                }
            }
            tracing::info!(upload = %upload_id, "the file changed since its upload started; starting afresh");
        }
        let media_id = media::random_media_id();
        let key = MediaKey::random();
        let scan = scan_file(&path, layout, &key, &media_id).await?;
        let record = UploadRecord {
            upload_id: upload_id.clone(),
            conversation_id: conversation.to_string(),
            media_id: media_id.clone(),
            key: key.to_base64().to_string(),
            size: layout.size(),
            chunk_bytes: layout.chunk_bytes(),
            sha256: STANDARD_NO_PAD.encode(scan.sha256),
            created_at_ms: chappe_proto::ids::unix_ms(),
        };
        {
            let mut local = self.inner.local.lock().await;
            local.uploads.insert(upload_id.clone(), record);
            // The key is on disk before any ciphertext leaves.
            self.persist(&local).await?;
        }
        Ok(UploadJob {
            upload_id,
            conversation,
            path,
            name,
            media_id,
            key,
            layout,
            scan: Arc::new(scan),
        })
    }

    /// Runs attempts until the server holds the whole object; returns
    /// (chunks sent by this call, chunks the server held at its start).
    async fn upload<P: Fn(Progress)>(
        &self,
        job: &UploadJob,
        stop_after: Option<u32>,
        progress: &P,
    ) -> Result<(u32, u32)> {
        let mut sent = 0u32;
        let mut skipped = None;
        let mut retries = Retries::new(&self.inner.config);
        loop {
            let used_token = self.inner.rpc.token().map(|t| t.token);
            let outcome = self
                .upload_attempt(job, stop_after, progress, &mut sent, &mut skipped)
                .await;
            let error = match outcome {
                Ok(Attempt::Complete) => {
                    progress(Progress::at(&job.layout, job.layout.chunk_count()));
                    return Ok((sent, skipped.unwrap_or(0)));
                }
                Ok(Attempt::Stopped) => {
                    let stored = match self.server_progress(job).await {
                        Ok((stored, _)) => stored,
                        Err(_) => skipped.unwrap_or(0).saturating_add(sent),
                    };
                    return Err(Error::UploadInterrupted {
                        upload_id: job.upload_id.clone(),
                        media_id: job.media_id.clone(),
                        stored_chunks: stored,
                    });
                }
                Ok(Attempt::Incomplete) => Error::Disconnected,
                Err(e) => e,
            };
            retries
                .after(self, error, used_token, &job.media_id, "upload")
                .await?;
        }
    }

    /// What the server holds of the upload: (stored chunks, complete).
    async fn server_progress(&self, job: &UploadJob) -> Result<(u32, bool)> {
        let info = match self.inner.rpc.media_status(&job.media_id).await {
            Ok(info) => info,
            Err(e) if e.code() == Some(tonic::Code::NotFound) => return Ok((0, false)),
            Err(e) => return Err(e),
        };
        let mismatch = |what: &str| -> Result<(u32, bool)> {
            Err(MediaError::InfoMismatch {
                media_id: job.media_id.clone(),
                what: what.to_owned(),
            }
            .into())
        };
        if info.size != job.layout.ciphertext_size() {
            return mismatch("size");
        }
        if info.chunk_size != job.layout.ciphertext_chunk_bytes() {
            return mismatch("chunk size");
        }
        if !info.sha256.is_empty() && info.sha256[..] != job.scan.sha256[..] {
            return mismatch("sha256");
        }
        Ok((
            info.stored_chunks.min(job.layout.chunk_count()),
            info.complete,
        ))
    }

    /// One `Status` + `Upload` round: sends the chunks the server lacks.
    async fn upload_attempt<P: Fn(Progress)>(
        &self,
        job: &UploadJob,
        stop_after: Option<u32>,
        progress: &P,
        sent: &mut u32,
        skipped: &mut Option<u32>,
    ) -> Result<Attempt> {
        let (stored, complete) = self.server_progress(job).await?;
        skipped.get_or_insert(stored);
        if complete {
            return Ok(Attempt::Complete);
        }
        progress(Progress::at(&job.layout, stored));
        let budget = stop_after.map(|k| k.saturating_sub(*sent));
        let (tx, rx) = mpsc::channel(UPLOAD_PIPELINE);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let start = pb::UploadFrame {
            body: Some(upload_frame::Body::Start(pb::MediaUploadStart {
                media_id: job.media_id.clone(),
                conversation_id: job.conversation.to_string(),
                size: job.layout.ciphertext_size(),
                chunk_size: job.layout.ciphertext_chunk_bytes(),
                sha256: job.scan.sha256.to_vec(),
            })),
        };
        tx.send(start).await.map_err(|_| Error::Disconnected)?;
        let chunks = Chunks {
            path: job.path.clone(),
            layout: job.layout,
            cipher: ChunkCipher::new(&job.key, &job.media_id)?,
            scan: job.scan.clone(),
            from: stored,
            budget,
        };
        let producer = tokio::spawn(produce(chunks, tx, done_tx));
        let (gateway_index, mut media) = self.inner.rpc.media();
        let call = media.upload(tonic::Request::new(ReceiverStream::new(rx)));
        tokio::pin!(call);
        // No chunk taken and no answer for this long: the stream stalled.
        let stall = self.inner.config.request_timeout;
        let mut deadline = Instant::now() + stall;
        let answered = loop {
            tokio::select! {
                answer = &mut call => break Some(answer),
                Some(index) = done_rx.recv() => {
                    *sent += 1;
                    progress(Progress::at(&job.layout, index + 1));
                    deadline = Instant::now() + stall;
                }
                _ = sleep_until(deadline) => break None,
            }
        };
        while let Ok(index) = done_rx.try_recv() {
            *sent += 1;
            progress(Progress::at(&job.layout, index + 1));
        }
        let Some(answer) = answered else {
            producer.abort();
            self.inner.rpc.fail_over(gateway_index);
            return Err(Error::Timeout(stall));
        };
        if answer.is_err() {
            // The stream is over; a producer still waiting has nothing to do.
            producer.abort();
        }
        let produced = match timeout(stall, producer).await {
            Ok(Ok(produced)) => Some(produced?),
            // Aborted (or, finishing late, given up on).
            Ok(Err(_)) | Err(_) => None,
        };
        let result = match answer {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if matches!(produced, Some(Produced::Stopped)) {
                    return Ok(Attempt::Stopped);
                }
                if status.code() == tonic::Code::Unavailable {
                    self.inner.rpc.fail_over(gateway_index);
                }
                return Err(status.into());
            }
        };
        match result.media {
            Some(info) if info.complete => {
                if (!info.sha256.is_empty() && info.sha256[..] != job.scan.sha256[..])
                    || info.size != job.layout.ciphertext_size()
                {
                    return Err(MediaError::InfoMismatch {
                        media_id: job.media_id.clone(),
                        what: "the stored object".into(),
                    }
                    .into());
                }
                Ok(Attempt::Complete)
            }
            _ if matches!(produced, Some(Produced::Stopped)) => Ok(Attempt::Stopped),
            _ => Ok(Attempt::Incomplete),
        }
    }

    // ----------------------------------------------------------- download

    /// Downloads an attachment to `dest`, verifying as it goes: each
    /// chunk's SHA-256, each chunk's authentication (index, position, key),
    /// and at the end the whole ciphertext's SHA-256 from the message.
    ///
    /// The plaintext is written to a hidden temporary file beside `dest`
    /// (readable by its owner only, as `dest` then is) and renamed to
    /// `dest` (replacing it) only once everything verified;
    /// on any failure the temporary file is removed and `dest` untouched. A
    /// transient failure is retried up to
    /// [`ClientConfig::media_attempts`](crate::ClientConfig::media_attempts)
    /// times from the next chunk. A tampered chunk is an [`Error::Media`];
    /// the server's refusals (`PERMISSION_DENIED` for a non-member,
    /// `NOT_FOUND`, `RESOURCE_EXHAUSTED`) are [`Error::Status`].
    pub async fn download(
        &self,
        attachment: &Attachment,
        dest: &Path,
        progress: impl Fn(Progress),
    ) -> Result<()> {
        let layout = attachment.layout()?;
        let mut opener = Opener::new(layout, attachment.cipher()?, attachment.sha256);
        let mut part = PartFile::create(dest).await?;
        progress(Progress::at(&layout, 0));
        let mut retries = Retries::new(&self.inner.config);
        loop {
            let used_token = self.inner.rpc.token().map(|t| t.token);
            let error = match self
                .download_attempt(attachment, &layout, &mut opener, &mut part, &progress)
                .await
            {
                Ok(()) => break,
                Err(e) => e,
            };
            retries
                .after(self, error, used_token, &attachment.media_id, "download")
                .await?;
        }
        opener.finish()?;
        part.commit(dest).await
    }

    /// One `Download` stream, from the next chunk the opener expects.
    async fn download_attempt<P: Fn(Progress)>(
        &self,
        attachment: &Attachment,
        layout: &Layout,
        opener: &mut Opener,
        part: &mut PartFile,
        progress: &P,
    ) -> Result<()> {
        let stall = self.inner.config.request_timeout;
        let (gateway_index, mut media) = self.inner.rpc.media();
        let request = pb::DownloadRequest {
            media_id: attachment.media_id.clone(),
            from_chunk: opener.next_index(),
        };
        let unavailable = |status: tonic::Status| {
            if status.code() == tonic::Code::Unavailable {
                self.inner.rpc.fail_over(gateway_index);
            }
            Error::from(status)
        };
        let mut stream = timeout(stall, media.download(request))
            .await
            .map_err(|_| Error::Timeout(stall))?
            .map_err(unavailable)?
            .into_inner();
        let mut described = false;
        while !opener.is_done() {
            let frame = timeout(stall, stream.message())
                .await
                .map_err(|_| Error::Timeout(stall))?
                .map_err(unavailable)?;
            let Some(frame) = frame else {
                return Err(MediaError::Truncated {
                    received: opener.next_index(),
                    expected: layout.chunk_count(),
                }
                .into());
            };
            match frame.body {
                Some(download_frame::Body::Info(info)) => {
                    check_info(attachment, layout, &info)?;
                    described = true;
                }
                Some(download_frame::Body::Chunk(chunk)) => {
                    if !described {
                        return Err(Error::protocol(
                            "a media chunk before the media's description",
                        ));
                    }
                    let plaintext = opener.open_chunk(chunk.index, chunk.data, &chunk.sha256)?;
                    let path = part.path.clone();
                    part.file()?
                        .write_all(&plaintext)
                        .await
                        .map_err(|e| Error::io(&path, e))?;
                    progress(Progress::at(layout, opener.next_index()));
                }
                None => return Err(Error::protocol("a download frame without a body")),
            }
        }
        Ok(())
    }
}

/// The server's description of a media object must be the one the message
/// gives (the message is what is trusted).
fn check_info(attachment: &Attachment, layout: &Layout, info: &pb::MediaInfo) -> Result<()> {
    let mismatch = |what: &str| -> Result<()> {
        Err(MediaError::InfoMismatch {
            media_id: attachment.media_id.clone(),
            what: what.to_owned(),
        }
        .into())
    };
    if !info.media_id.is_empty() && info.media_id != attachment.media_id {
        return mismatch("media id");
    }
    if info.size != layout.ciphertext_size() {
        return mismatch("size");
    }
    if info.chunk_size != layout.ciphertext_chunk_bytes() {
        return mismatch("chunk size");
    }
    if info.chunk_count != 0 && info.chunk_count != layout.chunk_count() {
        return mismatch("chunk count");
    }
    if !info.sha256.is_empty() && info.sha256[..] != attachment.sha256[..] {
        return mismatch("sha256");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
