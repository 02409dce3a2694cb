//! Uploads and downloads over real gRPC against an in-process mock of the
//! gateway's `Auth`, `Gateway` (key upload only) and `Media` services, which
//! stores chunks in memory and checks them as media does. The Megolm message
//! is not sent here (the mock has no `Connect`): these tests drive the
//! upload and the download themselves.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;

use chappe_proto::v1::auth_server::{Auth, AuthServer};
use chappe_proto::v1::gateway_server::{Gateway, GatewayServer};
use chappe_proto::v1::media_server::{Media as MediaService, MediaServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::{ClientConfig, KdfParams};

struct Object {
    start: pb::MediaUploadStart,
    chunks: Vec<Vec<u8>>,
    complete: bool,
}

impl Object {
    fn chunk_count(&self) -> u32 {
        self.start.size.div_ceil(u64::from(self.start.chunk_size)) as u32
    }

    fn info(&self) -> pb::MediaInfo {
        pb::MediaInfo {
            media_id: self.start.media_id.clone(),
            size: self.start.size,
            chunk_size: self.start.chunk_size,
            chunk_count: self.chunk_count(),
            stored_chunks: self.chunks.len() as u32,
            complete: self.complete,
            sha256: self.start.sha256.clone(),
            ..Default::default()
        }
    }
}

#[derive(Default)]
struct State {
    objects: HashMap<String, Object>,
    /// Every chunk index an `Upload` call stored, in order.
    received: Vec<u32>,
    /// The next `Upload` call fails with `UNAVAILABLE` once it stored this
    /// many chunks.
    fail_after: Option<u32>,
    /// Downloads serve this chunk with a flipped byte (and a matching hash).
    tamper: Option<u32>,
    /// Downloads are refused with this code.
    refuse_downloads: Option<tonic::Code>,
}

#[derive(Clone, Default)]
struct Mock(Arc<StdMutex<State>>);

impl Mock {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

#[tonic::async_trait]
impl Auth for Mock {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let r = request.into_inner();
        let Some(pb::login_request::Credential::Dev(dev)) = r.credential else {
            return Err(Status::invalid_argument("dev logins only"));
        };
        Ok(Response::new(pb::LoginResponse {
            session_token: "token".into(),
            device: Some(pb::DeviceRef {
                user_id: dev.user_id,
                device_id: r.device_id,
            }),
            expires_at_ms: chappe_proto::ids::unix_ms() + 86_400_000,
        }))
    }
}

#[tonic::async_trait]
impl Gateway for Mock {
    type ConnectStream = ReceiverStream<Result<pb::ServerFrame, Status>>;

    async fn connect(
        &self,
        _: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn upload_keys(
        &self,
        _: Request<pb::UploadKeysRequest>,
    ) -> Result<Response<pb::UploadKeysResponse>, Status> {
        Ok(Response::new(pb::UploadKeysResponse {
            one_time_key_count: 50,
        }))
    }
    async fn query_devices(
        &self,
        _: Request<pb::QueryDevicesRequest>,
    ) -> Result<Response<pb::QueryDevicesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn claim_keys(
        &self,
        _: Request<pb::ClaimKeysRequest>,
    ) -> Result<Response<pb::ClaimKeysResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn create_conversation(
        &self,
        _: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::CreateConversationResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn list_conversations(
        &self,
        _: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn get_conversation(
        &self,
        _: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn update_membership(
        &self,
        _: Request<pb::UpdateMembershipRequest>,
    ) -> Result<Response<pb::UpdateMembershipResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
    async fn history(
        &self,
        _: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
}

#[tonic::async_trait]
impl MediaService for Mock {
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadFrame>>,
    ) -> Result<Response<pb::UploadResult>, Status> {
        let mut stream = request.into_inner();
        let Some(pb::UploadFrame {
            body: Some(upload_frame::Body::Start(start)),
        }) = stream.message().await?
        else {
            return Err(Status::invalid_argument("start first"));
        };
        let id = start.media_id.clone();
        {
            let mut state = self.state();
            match state.objects.get(&id) {
                Some(o) if o.start != start => return Err(Status::already_exists("id taken")),
                Some(_) => {}
                None => {
                    state.objects.insert(
                        id.clone(),
                        Object {
                            start,
                            chunks: Vec::new(),
                            complete: false,
                        },
                    );
                }
            }
        }
        let mut received = 0;
        while let Some(frame) = stream.message().await? {
            let Some(upload_frame::Body::Chunk(chunk)) = frame.body else {
                return Err(Status::invalid_argument("chunks after start"));
            };
            let mut state = self.state();
            if state.fail_after == Some(received) {
                state.fail_after = None;
                return Err(Status::unavailable("mock outage"));
            }
            let object = state.objects.get_mut(&id).unwrap();
            if chunk.index as usize != object.chunks.len() {
                return Err(Status::failed_precondition("wrong index"));
            }
            if media::sha256(&chunk.data)[..] != chunk.sha256[..] {
                return Err(Status::invalid_argument("chunk hash"));
            }
            object.chunks.push(chunk.data);
            if object.chunks.len() as u32 == object.chunk_count() {
                let whole: Vec<u8> = object.chunks.concat();
                if media::sha256(&whole)[..] != object.start.sha256[..] {
                    return Err(Status::invalid_argument("whole hash"));
                }
                object.complete = true;
            }
            state.received.push(chunk.index);
            received += 1;
        }
        let state = self.state();
        Ok(Response::new(pb::UploadResult {
            media: Some(state.objects[&id].info()),
            chunks_received: received,
        }))
    }

    type DownloadStream = ReceiverStream<Result<pb::DownloadFrame, Status>>;

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let r = request.into_inner();
        let state = self.state();
        if let Some(code) = state.refuse_downloads {
            return Err(Status::new(code, "refused by the mock"));
        }
        let object = state
            .objects
            .get(&r.media_id)
            .filter(|o| o.complete)
            .ok_or_else(|| Status::not_found("no such media"))?;
        let (tx, rx) = mpsc::channel(object.chunks.len() + 1);
        let info = pb::DownloadFrame {
            body: Some(download_frame::Body::Info(object.info())),
        };
        tx.try_send(Ok(info)).unwrap();
        for (i, data) in object.chunks.iter().enumerate().skip(r.from_chunk as usize) {
            let mut data = data.clone();
            if state.tamper == Some(i as u32) {
                data[0] ^= 1;
            }
            let chunk = pb::MediaChunk {
                index: i as u32,
                sha256: media::sha256(&data).to_vec(),
                data,
            };
            tx.try_send(Ok(pb::DownloadFrame {
                body: Some(download_frame::Body::Chunk(chunk)),
            }))
            .unwrap();
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        request: Request<pb::MediaStatusRequest>,
    ) -> Result<Response<pb::MediaInfo>, Status> {
        let id = request.into_inner().media_id;
        match self.state().objects.get(&id) {
            Some(o) => Ok(Response::new(o.info())),
            None => Err(Status::not_found("no such upload")),
        }
    }
}

async fn start_mock() -> (Mock, String) {
    let mock = Mock::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = tonic::transport::Server::builder()
        .add_service(AuthServer::new(mock.clone()))
        .add_service(GatewayServer::new(mock.clone()))
        .add_service(
            MediaServer::new(mock.clone())
                .max_decoding_message_size(1 << 20)
                .max_encoding_message_size(1 << 20),
        );
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    (mock, url)
}

fn config(url: &str, dir: &Path) -> ClientConfig {
    let mut config = ClientConfig::new(url, dir, "pw");
    config.kdf = KdfParams::insecure_fast();
    config.media_chunk_bytes = 1000;
    config.reconnect_backoff_min = Duration::from_millis(10);
    config
}

/// A file of `len` bytes that compresses badly.
fn write_file(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

async fn job(client: &Client, path: &Path, upload_id: &str) -> UploadJob {
    let conversation = ConversationId::random();
    job_in(client, path, upload_id, conversation).await
}

async fn job_in(
    client: &Client,
    path: &Path,
    upload_id: &str,
    conversation: ConversationId,
) -> UploadJob {
    let len = std::fs::metadata(path).unwrap().len();
    let layout = Layout::new(len, client.inner.config.media_chunk_bytes as u32).unwrap();
    client
        .prepare_upload(
            upload_id.into(),
            conversation,
            path.to_owned(),
            "f.bin".into(),
            layout,
        )
        .await
        .unwrap()
}

fn attachment(job: &UploadJob) -> Attachment {
    Attachment::new(
        job.media_id.clone(),
        job.name.clone(),
        job.layout,
        job.key.clone(),
        job.scan.sha256,
    )
    .unwrap()
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn an_upload_cut_at_60_percent_resumes_after_a_restart_without_resending() {
    let (mock, url) = start_mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let state_dir = tmp.path().join("alice");
    let (path, data) = write_file(tmp.path(), "f.bin", 9_500); // 10 chunks
    let conversation = ConversationId::random();
    let media_id = {
        let client = Client::login_dev(config(&url, &state_dir), "alice", "A1")
            .await
            .unwrap();
        let job = job_in(&client, &path, "up1", conversation).await;
        assert_eq!(job.layout.chunk_count(), 10);
        let err = client.upload(&job, Some(6), &|_| {}).await.unwrap_err();
        match err {
            Error::UploadInterrupted {
                upload_id,
                stored_chunks,
                ..
            } => assert_eq!((upload_id.as_str(), stored_chunks), ("up1", 6)),
            other => panic!("expected an interruption, got {other}"),
        }
        assert_eq!(client.pending_uploads().await, ["up1"]);
        job.media_id.clone()
    };
    // A new process: the upload's id and key come back from the state.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = Client::open(config(&url, &state_dir)).await.unwrap();
    assert_eq!(client.pending_uploads().await, ["up1"]);
    let job = job_in(&client, &path, "up1", conversation).await;
    assert_eq!(job.media_id, media_id);
    let seen = StdMutex::new(Vec::new());
    let (sent, skipped) = client
        .upload(&job, None, &|p: Progress| {
            seen.lock().unwrap().push(p.chunks_done)
        })
        .await
        .unwrap();
    assert_eq!((sent, skipped), (4, 6));
    assert_eq!(mock.state().received, (0..10).collect::<Vec<_>>());
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.first(), Some(&6));
    assert_eq!(seen.last(), Some(&10));

    // The receiver's side: download and compare.
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("copy.bin");
    client
        .download(&attachment(&job), &dest, |_| {})
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(dir_entries(&out), ["copy.bin"]);
    // The server never saw the plaintext.
    let stored: Vec<u8> = mock.state().objects[&media_id].chunks.concat();
    let plaintext: std::collections::HashSet<&[u8]> = data.windows(32).collect();
    assert!(!stored.windows(32).any(|w| plaintext.contains(w)));
}

#[tokio::test]
async fn a_broken_stream_is_resumed_within_the_call() {
    let (mock, url) = start_mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::login_dev(config(&url, &tmp.path().join("a")), "alice", "A1")
        .await
        .unwrap();
    let (path, _) = write_file(tmp.path(), "f.bin", 5_000);
    mock.state().fail_after = Some(3);
    let job = job(&client, &path, "up").await;
    let (sent, skipped) = client.upload(&job, None, &|_| {}).await.unwrap();
    // Every chunk stored once; what was queued behind the outage was sent
    // again after it.
    assert_eq!(mock.state().received, (0..5).collect::<Vec<_>>());
    assert_eq!(skipped, 0);
    assert!(sent >= 5, "{sent}");
    assert!(mock.state().objects[&job.media_id].complete);
}

#[tokio::test]
async fn a_changed_file_starts_a_new_upload() {
    let (mock, url) = start_mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::login_dev(config(&url, &tmp.path().join("a")), "alice", "A1")
        .await
        .unwrap();
    let conversation = ConversationId::random();
    let (path, _) = write_file(tmp.path(), "f.bin", 3_000);
    let first = job_in(&client, &path, "up", conversation).await;
    assert!(client.upload(&first, Some(1), &|_| {}).await.is_err());
    // Same size, other content.
    std::fs::write(&path, vec![1u8; 3_000]).unwrap();
    let second = job_in(&client, &path, "up", conversation).await;
    assert_ne!(second.media_id, first.media_id);
    assert_eq!(client.upload(&second, None, &|_| {}).await.unwrap(), (3, 0));
    assert!(mock.state().objects[&second.media_id].complete);
    // Another conversation cannot take the upload over.
    let other = Layout::new(3_000, 1000).unwrap();
    let err = client
        .prepare_upload(
            "up".into(),
            ConversationId::random(),
            path.clone(),
            "f".into(),
            other,
        )
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
}

#[tokio::test]
async fn a_tampered_chunk_fails_the_download_and_leaves_nothing() {
    let (mock, url) = start_mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::login_dev(config(&url, &tmp.path().join("a")), "alice", "A1")
        .await
        .unwrap();
    let (path, _) = write_file(tmp.path(), "f.bin", 2_500);
    let job = job(&client, &path, "up").await;
    client.upload(&job, None, &|_| {}).await.unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.bin"), b"old").unwrap();

    mock.state().tamper = Some(1);
    let err = client
        .download(&attachment(&job), &out.join("keep.bin"), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Media(MediaError::ChunkAuthentication { index: 1 })
        ),
        "{err}"
    );
    // The old file is untouched and no temporary file is left.
    assert_eq!(std::fs::read(out.join("keep.bin")).unwrap(), b"old");
    assert_eq!(dir_entries(&out), ["keep.bin"]);

    // A message that lies about the file (another hash) is caught too.
    mock.state().tamper = None;
    let mut lying = attachment(&job);
    lying.sha256[0] ^= 1;
    let err = client
        .download(&lying, &out.join("x"), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Media(MediaError::InfoMismatch { .. })),
        "{err}"
    );

    // The server's refusals keep their code.
    mock.state().refuse_downloads = Some(tonic::Code::PermissionDenied);
    let err = client
        .download(&attachment(&job), &out.join("x"), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied));
    assert_eq!(dir_entries(&out), ["keep.bin"]);
}
