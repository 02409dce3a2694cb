//! The presence, typing and media scenarios of issue 5, written once and run
//! against the platform in one process (tests/presence_media.rs) and
//! against services in processes of their own over NATS (tests/cluster.rs).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use chappe_client::ids::UserId;
use chappe_client::{Attachment, ConversationKind, Error, Event, PresenceState, SendFileOptions};
use sha2::{Digest as _, Sha256};

use super::Deployment;
use super::scenarios::{Device, WAIT, device};

/// How soon a contact must see a user come online.
pub const ONLINE_WITHIN: Duration = Duration::from_secs(1);

/// Waits for `device`'s next presence change about `user`; other events are
/// kept (messages) or skipped.
pub async fn presence_of(
    device: &mut Device,
    user: &str,
    within: Duration,
) -> (PresenceState, Instant) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let event = tokio::time::timeout_at(deadline, device.events.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} saw no presence change of {user} within {within:?}",
                    device.client.user_id()
                )
            })
            .expect("events go on");
        match event {
            Event::PresenceChanged(p) if p.user_id.as_str() == user => {
                return (p.state, Instant::now());
            }
            Event::Message(m) => device.received.push(m),
            _ => {}
        }
    }
}

/// Everything `device` received until now that is about `user`'s presence
/// or typing (waits `quiet` for stragglers).
pub async fn heard_of(device: &mut Device, user: &str, quiet: Duration) -> Vec<Event> {
    let mut heard = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(quiet, device.events.next()).await {
        let about = match &event {
            Event::PresenceChanged(p) => p.user_id.as_str() == user,
            Event::Typing { user_id, .. } => user_id.as_str() == user,
            _ => false,
        };
        if about {
            heard.push(event);
        }
    }
    heard
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user id")
}

/// bob sees alice online within 1 s of her connecting and offline when she
/// leaves; typing reaches bob and is never stored; carol, who shares no
/// conversation with alice, never sees her presence or typing, by query or
/// by event.
pub async fn presence_typing_and_privacy(deployment: &impl Deployment) {
    // alice logs in (not connected yet) and opens a chat with bob; carol
    // shares a conversation with dave only.
    let alice = chappe_client::Client::login_dev(
        super::client_config(deployment, "alice-phone"),
        "alice",
        "phone",
    )
    .await
    .expect("alice logs in");
    let chat = alice
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .expect("alice opens a chat with bob");
    let mut bob = device(deployment, "bob", "tablet").await;
    let mut carol = device(deployment, "carol", "tablet").await;
    let dave = device(deployment, "dave", "tablet").await;
    carol
        .client
        .create_conversation(ConversationKind::Direct, &[user("dave")])
        .await
        .expect("carol opens a chat with dave");

    // alice connects: bob sees her online within 1 s.
    let connecting = Instant::now();
    let alice_events = alice.connect().await.expect("alice connects");
    let (state, seen_at) = presence_of(&mut bob, "alice", WAIT).await;
    assert_eq!(state, PresenceState::Online);
    let took = seen_at - connecting;
    assert!(took <= ONLINE_WITHIN, "bob saw alice online after {took:?}");

    // By query: bob sees her, carol does not (nor a user who does not
    // exist, the same way).
    let seen = bob.client.presence(&[user("alice")]).await.expect("query");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].state, PresenceState::Online);
    assert!(seen[0].last_seen_ms.is_some());
    let seen = carol
        .client
        .presence(&[user("alice"), user("nobody"), user("dave")])
        .await
        .expect("query");
    let users: Vec<_> = seen.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(users, ["dave"], "carol sees only her own contact");

    // Typing reaches bob, and nothing of it is stored.
    let stored_before = deployment
        .store()
        .messages_after(chat.id, None, 10_000)
        .await
        .expect("store read")
        .len();
    alice.set_typing(&chat.id, true).await.expect("typing");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, bob.events.next())
            .await
            .expect("bob hears alice typing")
            .expect("events go on");
        if let Event::Typing {
            conversation_id,
            user_id,
            typing,
            timeout,
        } = event
        {
            assert_eq!(conversation_id, chat.id);
            assert_eq!(user_id.as_str(), "alice");
            assert!(typing);
            assert!(timeout > Duration::ZERO);
            break;
        }
    }
    assert_eq!(
        deployment
            .store()
            .messages_after(chat.id, None, 10_000)
            .await
            .expect("store read")
            .len(),
        stored_before,
        "typing is never stored"
    );
    // carol may not type in a conversation she is not in.
    let refused = carol.client.set_typing(&chat.id, true).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::PermissionDenied),
        "{refused}"
    );

    // alice leaves: bob sees her offline.
    alice.disconnect();
    drop(alice_events);
    let (state, _) = presence_of(&mut bob, "alice", WAIT).await;
    assert_eq!(state, PresenceState::Offline);

    // carol heard nothing of alice, from first to last.
    let heard = heard_of(&mut carol, "alice", Duration::from_millis(300)).await;
    assert!(heard.is_empty(), "carol heard of alice: {heard:?}");
    drop(dave);
}

/// A deterministic, incompressible test file of `len` bytes.
pub fn write_test_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    let mut block = Sha256::digest(b"chappe test file").to_vec();
    while data.len() < len {
        block = Sha256::digest(&block).to_vec();
        data.extend_from_slice(&block);
    }
    data.truncate(len);
    std::fs::write(path, &data).expect("test file written");
    data
}

/// Waits until `device` received a message with an attachment named `name`.
pub async fn attachment_named(device: &mut Device, name: &str) -> Attachment {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(a) = device
            .received
            .iter()
            .find_map(|m| m.attachment.clone().filter(|a| a.name == name))
        {
            return a;
        }
        let event = tokio::time::timeout_at(deadline, device.events.next())
            .await
            .unwrap_or_else(|_| panic!("{} got no file {name}", device.client.user_id()))
            .expect("events go on");
        if let Event::Message(m) = event {
            device.received.push(m);
        }
    }
}

/// The 16-byte blocks of `plain` at 16-byte offsets (any 32-byte run of
/// `plain` holds one of them whole), with a bitmap of a hash of their first
/// eight bytes, so that most offsets of a scan cost one bit test.
struct PlaintextBlocks {
    blocks: HashSet<[u8; 16]>,
    bitmap: Vec<u64>,
}

const BITMAP_BITS: u32 = 27;

fn bit(bytes: &[u8]) -> usize {
    let head = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    (head.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BITMAP_BITS)) as usize
}

fn plaintext_blocks(plain: &[u8]) -> PlaintextBlocks {
    let mut bitmap = vec![0u64; (1 << BITMAP_BITS) / 64];
    let blocks: HashSet<[u8; 16]> = plain
        .chunks_exact(16)
        .map(|b| b.try_into().expect("16 bytes"))
        .collect();
    for block in &blocks {
        let b = bit(block);
        bitmap[b / 64] |= 1 << (b % 64);
    }
    PlaintextBlocks { blocks, bitmap }
}

/// Whether `data` holds one of `blocks` at any offset.
fn holds_plaintext(data: &[u8], plain: &PlaintextBlocks) -> bool {
    data.windows(16).any(|w| {
        let b = bit(w);
        plain.bitmap[b / 64] & (1 << (b % 64)) != 0
            && plain
                .blocks
                .contains(<&[u8; 16]>::try_from(w).expect("16 bytes"))
    })
}

/// How thoroughly [`file_travels_encrypted_and_resumes`] looks for
/// plaintext in what the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaintextScan {
    /// Every stored chunk, at every byte offset (tens of seconds for 50 MiB
    /// in a debug build).
    EveryChunk,
    /// The first and the last chunk: the bytes stored are the client's, the
    /// same whatever the deployment, so one deployment scanning all is
    /// enough.
    FirstAndLast,
}

/// A file of `size` bytes travels from alice to both of bob's devices and
/// decrypts to the same bytes; the upload, cut at 60%, resumes without
/// resending what was stored; no stored chunk holds a run of the plaintext;
/// carol, not a member, is refused the download.
pub async fn file_travels_encrypted_and_resumes(
    deployment: &impl Deployment,
    size: usize,
    scan: PlaintextScan,
) {
    let alice = device(deployment, "alice", "laptop").await;
    let mut bob_laptop = device(deployment, "bob", "laptop").await;
    let mut bob_phone = device(deployment, "bob", "phone").await;
    let carol = device(deployment, "carol", "laptop").await;
    let chat = alice
        .client
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .expect("conversation");

    let files = deployment.dir().join("files");
    std::fs::create_dir_all(&files).expect("files directory");
    let path = files.join("rapport-annuel.bin");
    let plain = write_test_file(&path, size);

    // The upload is cut at 60% of its chunks.
    let chunk_bytes = super::client_config(deployment, "alice-laptop").media_chunk_bytes;
    let chunks = size.div_ceil(chunk_bytes) as u32;
    let cut_at = chunks * 6 / 10;
    let options = SendFileOptions {
        upload_id: Some("rapport".into()),
        stop_after_chunks: Some(cut_at),
    };
    let cut = alice
        .client
        .send_file_with(&chat.id, &path, options, |_| {})
        .await
        .expect_err("the upload is cut");
    let Error::UploadInterrupted {
        media_id,
        stored_chunks,
        ..
    } = cut
    else {
        panic!("expected an interrupted upload, got {cut}");
    };
    assert_eq!(stored_chunks, cut_at);
    let stored = deployment
        .store()
        .get_object(&media_id)
        .await
        .expect("store read")
        .expect("the cut upload is kept");
    assert_eq!(stored.stored_chunks, cut_at);
    assert!(!stored.object.complete);

    // Resumed: only what was missing is sent.
    let options = SendFileOptions {
        upload_id: Some("rapport".into()),
        stop_after_chunks: None,
    };
    let sent = alice
        .client
        .send_file_with(&chat.id, &path, options, |_| {})
        .await
        .expect("the upload resumes");
    assert_eq!(sent.media_id, media_id);
    assert_eq!(sent.chunks_skipped, cut_at);
    assert_eq!(sent.chunks_sent, chunks - cut_at);

    // Both of bob's devices get it and decrypt the same bytes.
    let want = Sha256::digest(&plain);
    for (bob, name) in [(&mut bob_laptop, "laptop"), (&mut bob_phone, "phone")] {
        let attachment = attachment_named(bob, "rapport-annuel.bin").await;
        assert_eq!(attachment.size, size as u64);
        let dest = files.join(format!("bob-{name}.bin"));
        bob.client
            .download(&attachment, &dest, |_| {})
            .await
            .expect("bob downloads");
        let got = std::fs::read(&dest).expect("downloaded file");
        assert_eq!(got.len(), size);
        assert_eq!(Sha256::digest(&got), want, "bob's {name} has other bytes");
    }

    // carol is not a member: refused, and nothing is written.
    let attachment = attachment_named(&mut bob_laptop, "rapport-annuel.bin").await;
    let dest = files.join("carol.bin");
    let refused = carol
        .client
        .download(&attachment, &dest, |_| {})
        .await
        .expect_err("carol may not download");
    assert_eq!(
        refused.code(),
        Some(tonic::Code::PermissionDenied),
        "{refused}"
    );
    assert!(!dest.exists());

    // What the store holds is ciphertext: no chunk holds a run of the file
    // (which the scan would see, at any offset).
    let blocks = plaintext_blocks(&plain);
    assert!(holds_plaintext(
        &plain[size / 2 + 7..size / 2 + 39],
        &blocks
    ));
    let stored = deployment
        .store()
        .get_object(&media_id)
        .await
        .expect("store read")
        .expect("stored");
    assert!(stored.object.complete);
    assert_eq!(stored.stored_chunks, chunks);
    let scanned: Vec<u32> = match scan {
        PlaintextScan::EveryChunk => (0..chunks).collect(),
        PlaintextScan::FirstAndLast => vec![0, chunks - 1],
    };
    for idx in scanned {
        let chunk = deployment
            .store()
            .get_chunk(&media_id, idx)
            .await
            .expect("store read")
            .expect("chunk stored");
        assert!(
            !holds_plaintext(&chunk.data, &blocks),
            "stored chunk {idx} holds plaintext"
        );
    }
    let _ = std::fs::remove_dir_all(&files);
}
