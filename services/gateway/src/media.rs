//! The `Media` gRPC service: encrypted attachments, forwarded chunk by
//! chunk to the media service over the bus.
//!
//! The gateway never holds more than a chunk or two of a file: an upload's
//! chunks are stored one by one (`chappe.rpc.media.put_chunk`) as they are
//! read, and a download asks for the next chunk only when the client has
//! room for it (a bounded channel). So moving a 1 GiB file costs the
//! gateway a few chunks of memory, not the file.
//!
//! An upload is refused at its `start` frame (size limit, quota, membership)
//! before any chunk is read; the first failing chunk ends the upload with
//! its status, and what was stored before it stays, for a resume.

use std::sync::Arc;
use std::time::Instant;

use chappe_bus::RpcError;
use chappe_bus::subjects::MediaMethod;
use chappe_proto::internal as wire;
use chappe_proto::v1::{self, download_frame, upload_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::auth::Identity;
use crate::service::{Inner, observe, request_span, trace_headers};

/// Download chunks buffered towards one client: the next is fetched while
/// the previous ones are sent.
const DOWNLOAD_AHEAD: usize = 2;

/// The `Media` service.
#[derive(Clone)]
pub struct MediaService(Arc<Inner>);

impl MediaService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self(inner)
    }

    fn subject(&self, method: MediaMethod) -> String {
        self.0.subjects.media(method)
    }

    /// Reads and stores an upload's frames; see [`v1::media_server::Media::upload`].
    async fn upload_inner(
        &self,
        identity: &Identity,
        mut frames: Streaming<v1::UploadFrame>,
    ) -> Result<v1::UploadResult, Status> {
        self.0.limits.call(identity)?;
        let first = frames
            .message()
            .await
            .map_err(|s| self.stream_error(s))?
            .ok_or_else(|| Status::invalid_argument("an upload begins with a start frame"))?;
        let Some(upload_frame::Body::Start(start)) = first.body else {
            return Err(Status::invalid_argument(
                "an upload begins with a start frame",
            ));
        };
        let media_id = start.media_id.clone();
        let begin = wire::MediaBegin {
            actor: Some(identity.to_wire()),
            start: Some(start),
        };
        let mut info: v1::MediaInfo = self
            .0
            .call(self.subject(MediaMethod::Begin), &begin)
            .await?;
        let mut received = 0u32;
        while let Some(frame) = frames.message().await.map_err(|s| self.stream_error(s))? {
            let Some(upload_frame::Body::Chunk(chunk)) = frame.body else {
                return Err(Status::invalid_argument(
                    "after the start frame, an upload carries only chunks",
                ));
            };
            let put = wire::MediaPutChunk {
                actor: Some(identity.to_wire()),
                media_id: media_id.clone(),
                chunk: Some(chunk),
            };
            info = self
                .0
                .call(self.subject(MediaMethod::PutChunk), &put)
                .await?;
            received += 1;
        }
        Ok(v1::UploadResult {
            media: Some(info),
            chunks_received: received,
        })
    }

    /// What a broken upload stream tells the client.
    fn stream_error(&self, status: Status) -> Status {
        match status.code() {
            // tonic reports a frame over max_decoding_message_size this way.
            Code::OutOfRange => Status::resource_exhausted(format!(
                "media frame larger than max_media_frame_bytes ({} bytes): {}",
                self.0.config.max_media_frame_bytes,
                status.message()
            )),
            _ => status,
        }
    }
}

/// Sends `info` then chunks `from..info.chunk_count` to `tx`, fetching each
/// only when the client has room for it. Stops at the first failure (sent
/// to the client as the stream's status) or when the client goes away.
async fn stream_chunks(
    inner: Arc<Inner>,
    identity: Identity,
    info: v1::MediaInfo,
    from: u32,
    tx: mpsc::Sender<Result<v1::DownloadFrame, Status>>,
) {
    let (media_id, count) = (info.media_id.clone(), info.chunk_count);
    let frame = v1::DownloadFrame {
        body: Some(download_frame::Body::Info(info)),
    };
    if tx.send(Ok(frame)).await.is_err() {
        return;
    }
    let subject = inner.subjects.media(MediaMethod::GetChunk);
    for index in from..count {
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let request = wire::MediaGetChunk {
            actor: Some(identity.to_wire()),
            media_id: media_id.clone(),
            index,
        };
        let result: Result<v1::MediaChunk, RpcError> = inner.call(subject.clone(), &request).await;
        match result {
            Ok(chunk) => permit.send(Ok(v1::DownloadFrame {
                body: Some(download_frame::Body::Chunk(chunk)),
            })),
            Err(e) => {
                permit.send(Err(e.into()));
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl v1::media_server::Media for MediaService {
    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadFrame>>,
    ) -> Result<Response<v1::UploadResult>, Status> {
        let identity = Identity::of(&request)?;
        let span = request_span("Media/Upload", &identity);
        chappe_telemetry::otel::set_parent(&span, &trace_headers(request.metadata()));
        let started = Instant::now();
        let result = self
            .upload_inner(&identity, request.into_inner())
            .instrument(span.clone())
            .await;
        let code = result.as_ref().map_or_else(|e| e.code(), |_| Code::Ok);
        observe(&span, "Media/Upload", code, started);
        result.map(Response::new)
    }

    type DownloadStream = ReceiverStream<Result<v1::DownloadFrame, Status>>;

    async fn download(
        &self,
        request: Request<v1::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let identity = Identity::of(&request)?;
        let span = request_span("Media/Download", &identity);
        chappe_telemetry::otel::set_parent(&span, &trace_headers(request.metadata()));
        let started = Instant::now();
        let request = request.into_inner();
        let opened: Result<v1::MediaInfo, Status> = async {
            self.0.limits.call(&identity)?;
            let open = wire::MediaOpen {
                actor: Some(identity.to_wire()),
                media_id: request.media_id.clone(),
            };
            let info: v1::MediaInfo = self.0.call(self.subject(MediaMethod::Open), &open).await?;
            if request.from_chunk > info.chunk_count {
                return Err(Status::out_of_range(format!(
                    "from_chunk {} is past the last chunk ({} chunks)",
                    request.from_chunk, info.chunk_count
                )));
            }
            Ok(info)
        }
        .instrument(span.clone())
        .await;
        let code = opened.as_ref().map_or_else(|e| e.code(), |_| Code::Ok);
        observe(&span, "Media/Download", code, started);
        let info = opened?;
        let (tx, rx) = mpsc::channel(DOWNLOAD_AHEAD);
        tokio::spawn(
            stream_chunks(self.0.clone(), identity, info, request.from_chunk, tx).instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        request: Request<v1::MediaStatusRequest>,
    ) -> Result<Response<v1::MediaInfo>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::MediaStatus {
            actor: Some(identity.to_wire()),
            media_id: request.into_inner().media_id,
        };
        let subject = self.subject(MediaMethod::Status);
        self.0
            .unary("Media/Status", &parent, &identity, subject, &req)
            .await
    }
}
