//! Bad input gets a precise gRPC status, and the gateway keeps serving
//! everyone else (DESIGN.md invariant 6).

mod common;

use std::time::Duration;

use bytes::Bytes;
use chappe_proto::v1::{
    ClientFrame, ConversationKind, CreateConversationRequest, DeviceKeys, DeviceRef,
    GetConversationRequest, ListConversationsRequest, Ping, SendMessage, SendToDevice, ServerFrame,
    ToDeviceMessage, UploadKeysRequest, client_frame, server_frame,
};
use common::{RawCodec, TestPlatform, megolm_ciphertext};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;

const SMALL_FRAME: usize = 4 * 1024;

/// An open Connect stream, frames in and out.
struct Stream {
    tx: mpsc::Sender<ClientFrame>,
    rx: tonic::Streaming<ServerFrame>,
}

impl Stream {
    async fn open(platform: &TestPlatform, token: &str) -> Stream {
        let (tx, rx) = mpsc::channel(16);
        let mut client = platform.client(Some(token.to_owned())).await;
        let rx = client
            .connect(ReceiverStream::new(rx))
            .await
            .expect("stream opens")
            .into_inner();
        Stream { tx, rx }
    }

    /// Sends a frame and returns the answer with its request id.
    async fn ask(&mut self, request_id: u64, body: client_frame::Body) -> server_frame::Body {
        self.tx
            .send(ClientFrame {
                request_id,
                trace_context: Default::default(),
                body: Some(body),
            })
            .await
            .expect("stream open");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.rx.next())
                .await
                .expect("answer in time")
                .expect("stream open")
                .expect("frame");
            if frame.request_id == request_id {
                return frame.body.expect("answer has a body");
            }
        }
    }

    /// The status that ends the stream.
    async fn end(mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.next())
                .await
                .expect("stream ends in time")
            {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return status,
                None => panic!("stream ended without a status"),
            }
        }
    }
}

fn frame_error(body: server_frame::Body) -> (Code, String) {
    match body {
        server_frame::Body::Error(e) => (Code::from_i32(e.code as i32), e.message),
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn ping_works(stream: &mut Stream, nonce: u64) {
    match stream
        .ask(nonce, client_frame::Body::Ping(Ping { nonce }))
        .await
    {
        server_frame::Body::Pong(p) => assert_eq!(p.nonce, nonce),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_gets_its_status_and_others_are_served() {
    let platform = TestPlatform::start_with(|c| c.gateway.max_frame_bytes = SMALL_FRAME).await;

    // A well-behaved client, connected throughout.
    let good_token = platform.token("grace", "phone").await;
    let mut good = Stream::open(&platform, &good_token).await;
    ping_works(&mut good, 1).await;

    // No token, a forged token: UNAUTHENTICATED, for unary and stream alike.
    let mut anonymous = platform.client(None).await;
    let status = anonymous
        .create_conversation(CreateConversationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let (_tx, rx) = mpsc::channel::<ClientFrame>(1);
    let status = anonymous
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut forged = platform.client(Some(format!("{good_token}x"))).await;
    let status = forged
        .list_conversations(ListConversationsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Keys with a bad signature: INVALID_ARGUMENT.
    let mallory_token = platform.token("mallory", "laptop").await;
    let mut mallory = platform.client(Some(mallory_token.clone())).await;
    let account = vodozemac::olm::Account::new();
    let keys = account.identity_keys();
    let status = mallory
        .upload_keys(UploadKeysRequest {
            device_keys: Some(DeviceKeys {
                user_id: "mallory".into(),
                device_id: "laptop".into(),
                curve25519: keys.curve25519.to_base64(),
                ed25519: keys.ed25519.to_base64(),
                signature: account.sign("something else").to_base64(),
                created_at_ms: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // An unknown conversation: NOT_FOUND, unary and on the stream.
    let unknown = format!("c{:032x}", 42);
    let status = mallory
        .get_conversation(GetConversationRequest {
            conversation_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut stream = Stream::open(&platform, &mallory_token).await;
    let (ciphertext, session_id) = megolm_ciphertext("hello");
    let send = |conversation_id: &str, client_msg_id: &str| SendMessage {
        conversation_id: conversation_id.into(),
        client_msg_id: client_msg_id.into(),
        ciphertext: ciphertext.clone(),
        session_id: session_id.clone(),
    };
    let (code, _) = frame_error(
        stream
            .ask(1, client_frame::Body::Send(send(&unknown, "m1")))
            .await,
    );
    assert_eq!(code, Code::NotFound);

    // A send to a conversation mallory is not a member of: PERMISSION_DENIED.
    let mut grace = platform.client(Some(good_token.clone())).await;
    let private = grace
        .create_conversation(CreateConversationRequest {
            kind: ConversationKind::Direct as i32,
            member_user_ids: vec!["henri".into()],
        })
        .await
        .expect("grace creates a conversation")
        .into_inner()
        .conversation
        .expect("conversation")
        .conversation_id;
    let (code, message) = frame_error(
        stream
            .ask(2, client_frame::Body::Send(send(&private, "m2")))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{message}");
    let status = mallory
        .get_conversation(GetConversationRequest {
            conversation_id: private.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // To-device messages to a stranger (no shared conversation): refused.
    let (olm_type, olm) = common::olm_ciphertext();
    let to_stranger = client_frame::Body::SendToDevice(SendToDevice {
        client_msg_id: "td1".into(),
        messages: vec![ToDeviceMessage {
            recipient: Some(DeviceRef {
                user_id: "grace".into(),
                device_id: "phone".into(),
            }),
            olm_type,
            ciphertext: olm,
        }],
    });
    let (code, message) = frame_error(stream.ask(20, to_stranger).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");

    // Something that is not a Megolm message, a malformed id, an empty
    // frame: INVALID_ARGUMENT, and the stream goes on.
    let mut not_megolm = send(&private, "m3");
    not_megolm.ciphertext = b"plaintext pretending".to_vec();
    let (code, _) = frame_error(stream.ask(3, client_frame::Body::Send(not_megolm)).await);
    assert_eq!(code, Code::InvalidArgument);
    let (code, _) = frame_error(
        stream
            .ask(4, client_frame::Body::Send(send("nope", "m4")))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    stream
        .tx
        .send(ClientFrame {
            request_id: 5,
            trace_context: Default::default(),
            body: None,
        })
        .await
        .unwrap();
    let (code, _) = frame_error(loop {
        let f = stream.rx.next().await.unwrap().unwrap();
        if f.request_id == 5 {
            break f.body.unwrap();
        }
    });
    assert_eq!(code, Code::InvalidArgument);
    ping_works(&mut stream, 6).await;

    // A frame over the size limit ends that stream with RESOURCE_EXHAUSTED.
    let mut huge = send(&private, "m7");
    huge.ciphertext = vec![0u8; SMALL_FRAME * 2];
    stream
        .tx
        .send(ClientFrame {
            request_id: 7,
            trace_context: Default::default(),
            body: Some(client_frame::Body::Send(huge)),
        })
        .await
        .unwrap();
    let status = stream.end().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Malformed protobuf, on the stream and on a unary call: INVALID_ARGUMENT.
    let garbage = Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    assert!(ClientFrame::decode(garbage.clone()).is_err());
    let mut raw = tonic::client::Grpc::new(platform.channel().await);
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(vec![garbage.clone()]));
    let bearer: MetadataValue<_> = format!("Bearer {mallory_token}").parse().unwrap();
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    let path = "/chappe.v1.Gateway/Connect".parse().unwrap();
    let status = match raw.streaming(request, path, RawCodec).await {
        Err(status) => status,
        Ok(response) => {
            let mut frames = response.into_inner();
            loop {
                match frames.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => break status,
                    None => panic!("stream closed without a status"),
                }
            }
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(garbage);
    request.metadata_mut().insert("authorization", bearer);
    let path = "/chappe.v1.Gateway/UploadKeys".parse().unwrap();
    let status = raw.unary(request, path, RawCodec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Through all of it, the good client was served without a hitch.
    ping_works(&mut good, 2).await;
    let listed = grace
        .list_conversations(ListConversationsRequest::default())
        .await
        .expect("still served")
        .into_inner();
    assert_eq!(listed.conversations.len(), 1);

    drop(good);
    platform.platform.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sends_gets_resource_exhausted_with_retry_after() {
    let platform = TestPlatform::start_with(|c| {
        c.gateway.send_rate_per_second = 1;
        c.gateway.send_burst = 3;
    })
    .await;
    let token = platform.token("flood", "bot").await;
    let mut client = platform.client(Some(token.clone())).await;
    let conversation = client
        .create_conversation(CreateConversationRequest {
            kind: ConversationKind::Group as i32,
            member_user_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .conversation_id;
    let mut stream = Stream::open(&platform, &token).await;
    let (ciphertext, session_id) = megolm_ciphertext("spam");
    let mut exhausted = None;
    for i in 0..10u64 {
        let body = client_frame::Body::Send(SendMessage {
            conversation_id: conversation.clone(),
            client_msg_id: format!("flood-{i}"),
            ciphertext: ciphertext.clone(),
            session_id: session_id.clone(),
        });
        match stream.ask(i + 1, body).await {
            server_frame::Body::Sent(_) => assert!(i < 3, "send {i} passed the burst"),
            server_frame::Body::Error(e) => {
                exhausted = Some(e);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let e = exhausted.expect("the flood was limited");
    assert_eq!(Code::from_i32(e.code as i32), Code::ResourceExhausted);
    assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 1_000, "{e:?}");
    ping_works(&mut stream, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_has_one_stream_and_the_newer_one_wins() {
    let platform = TestPlatform::start().await;
    let token = platform.token("hugo", "phone").await;
    let mut first = Stream::open(&platform, &token).await;
    ping_works(&mut first, 1).await;
    let mut second = Stream::open(&platform, &token).await;
    // The older stream is told to go, then ends; the newer one is served.
    let frame = tokio::time::timeout(Duration::from_secs(10), first.rx.next())
        .await
        .expect("in time")
        .expect("a frame")
        .expect("not an error");
    assert!(
        matches!(frame.body, Some(server_frame::Body::Goaway(_))),
        "{frame:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), first.rx.next())
        .await
        .expect("in time");
    assert!(matches!(ended, None | Some(Err(_))), "{ended:?}");
    ping_works(&mut second, 2).await;
}
