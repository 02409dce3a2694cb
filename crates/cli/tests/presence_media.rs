//! Presence, typing and encrypted attachments end to end, with every
//! service in this process (the same scenarios run over NATS with each
//! service in its own process in tests/cluster.rs), and the media limits
//! as a client meets them through the gateway.

mod common;

use std::time::Duration;

use chappe_client::ConversationKind;
use chappe_client::ids::UserId;
use chappe_proto::v1::media_client::MediaClient;
use chappe_proto::v1::{MediaChunk, MediaUploadStart, UploadFrame, upload_frame};
use common::presence_media::{self, write_test_file};
use common::scenarios::device;
use common::{Bearer, TestPlatform};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contacts_see_presence_and_typing_and_strangers_see_nothing() {
    let platform = TestPlatform::start().await;
    presence_media::presence_typing_and_privacy(&platform).await;
    platform.platform.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fifty_mib_file_reaches_both_devices_encrypted_and_resumes_after_a_cut() {
    let platform = TestPlatform::start().await;
    presence_media::file_travels_encrypted_and_resumes(
        &platform,
        50 * MIB,
        presence_media::PlaintextScan::EveryChunk,
    )
    .await;
    platform.platform.shutdown().await.expect("clean shutdown");
}

/// A raw `Media` client for `user`'s device D1, to put on the wire what the
/// SDK never would.
async fn raw_media(
    platform: &TestPlatform,
    user: &str,
) -> MediaClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>
{
    let token = platform.token(user, "D1").await;
    MediaClient::with_interceptor(platform.channel().await, Bearer(Some(token)))
}

fn start_frame(media_id: &str, conversation: &str, size: u64, sha256: Vec<u8>) -> UploadFrame {
    UploadFrame {
        body: Some(upload_frame::Body::Start(MediaUploadStart {
            media_id: media_id.into(),
            conversation_id: conversation.into(),
            size,
            chunk_size: 64 * 1024,
            sha256,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_uploads_get_precise_statuses_and_leave_nothing() {
    let platform = TestPlatform::start_with(|c| {
        c.media.max_upload_bytes = 8 * MIB as u64;
        c.media.quota_bytes = 8 * MIB as u64;
    })
    .await;
    let alice = device(&platform, "alice", "D1").await;
    let chat = alice
        .client
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .expect("conversation");
    let conversation = chat.id.to_string();
    let mut media = raw_media(&platform, "alice").await;

    // Over the size limit: refused at the start frame, while the client
    // still holds the stream open with the whole body unsent.
    let (tx, rx) = mpsc::channel(4);
    tx.send(start_frame(
        &"a".repeat(32),
        &conversation,
        9 * MIB as u64,
        vec![0; 32],
    ))
    .await
    .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        media.upload(ReceiverStream::new(rx)),
    )
    .await
    .expect("answered before the body was sent");
    let status = answer.expect_err("over-size upload refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_upload_bytes"), "{status:?}");
    drop(tx);

    // A chunk whose hash does not match its data: refused, nothing kept.
    let data = vec![7u8; 64 * 1024];
    let media_id = "b".repeat(32);
    let frames = vec![
        start_frame(
            &media_id,
            &conversation,
            data.len() as u64,
            Sha256::digest(&data).to_vec(),
        ),
        UploadFrame {
            body: Some(upload_frame::Body::Chunk(MediaChunk {
                index: 0,
                data: data.clone(),
                sha256: vec![0; 32],
            })),
        },
    ];
    let status = media
        .upload(tokio_stream::iter(frames))
        .await
        .expect_err("a chunk with a wrong hash is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("hash"), "{status:?}");
    let stored = platform
        .platform
        .store()
        .get_object(&media_id)
        .await
        .unwrap()
        .expect("the upload was opened");
    assert_eq!(stored.stored_chunks, 0);
    assert!(
        platform
            .platform
            .store()
            .get_chunk(&media_id, 0)
            .await
            .unwrap()
            .is_none()
    );

    // A frame over max_media_frame_bytes ends the upload with
    // RESOURCE_EXHAUSTED, naming the limit.
    let huge = vec![1u8; 600 * 1024];
    let frames = vec![
        start_frame(
            &"c".repeat(32),
            &conversation,
            huge.len() as u64,
            Sha256::digest(&huge).to_vec(),
        ),
        UploadFrame {
            body: Some(upload_frame::Body::Chunk(MediaChunk {
                index: 0,
                sha256: Sha256::digest(&huge).to_vec(),
                data: huge,
            })),
        },
    ];
    let status = media
        .upload(tokio_stream::iter(frames))
        .await
        .expect_err("an oversized frame is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_media_frame_bytes"),
        "{status:?}"
    );

    // Unknown ids: NOT_FOUND, for downloads and for status alike; another
    // user's upload is as unknown to bob as one that does not exist.
    let status = media
        .download(chappe_proto::v1::DownloadRequest {
            media_id: "d".repeat(32),
            from_chunk: 0,
        })
        .await
        .expect_err("unknown media");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let mut bob_media = raw_media(&platform, "bob").await;
    let status = bob_media
        .status(chappe_proto::v1::MediaStatusRequest {
            media_id: media_id.clone(),
        })
        .await
        .expect_err("not bob's upload");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = bob_media
        .status(chappe_proto::v1::MediaStatusRequest {
            media_id: "not an id".into(),
        })
        .await
        .expect_err("malformed id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A frame other than start first, and an empty upload: INVALID_ARGUMENT.
    let status = media
        .upload(tokio_stream::iter(Vec::<UploadFrame>::new()))
        .await
        .expect_err("an empty upload is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Over quota: a user who uploaded 6 MiB of an 8 MiB daily quota cannot
    // upload 3 more, and is told when to come back.
    let files = platform.dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let first = files.join("six.bin");
    write_test_file(&first, 6 * MIB);
    alice
        .client
        .send_file(&chat.id, &first, |_| {})
        .await
        .expect("within quota");
    let second = files.join("three.bin");
    write_test_file(&second, 3 * MIB);
    let refused = alice
        .client
        .send_file(&chat.id, &second, |_| {})
        .await
        .expect_err("over quota");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::ResourceExhausted),
        "{refused}"
    );
    let retry = refused.retry_after().expect("a retry time");
    assert!(
        retry > Duration::from_secs(23 * 3600) && retry <= Duration::from_secs(24 * 3600),
        "retry after {retry:?}"
    );
    platform.platform.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_past_its_retention_is_gone_from_the_store() {
    let platform = TestPlatform::start_with(|c| {
        c.media.retention = Duration::from_secs(2);
        c.media.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let alice = device(&platform, "alice", "D1").await;
    let mut bob = device(&platform, "bob", "D1").await;
    let chat = alice
        .client
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .expect("conversation");
    let files = platform.dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let path = files.join("note.bin");
    write_test_file(&path, 300 * 1024);
    let sent = alice
        .client
        .send_file(&chat.id, &path, |_| {})
        .await
        .expect("sent");
    let attachment = presence_media::attachment_named(&mut bob, "note.bin").await;
    let store = platform.platform.store();
    assert!(store.get_object(&sent.media_id).await.unwrap().is_some());

    // Past the retention, the sweeper deletes the object and its chunks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get_object(&sent.media_id).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "media outlived its retention"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for idx in 0..2 {
        assert!(
            store
                .get_chunk(&sent.media_id, idx)
                .await
                .unwrap()
                .is_none()
        );
    }
    let gone = bob
        .client
        .download(&attachment, &files.join("late.bin"), |_| {})
        .await
        .expect_err("expired media cannot be downloaded");
    assert_eq!(gone.code(), Some(tonic::Code::NotFound), "{gone}");
    platform.platform.shutdown().await.expect("clean shutdown");
}
