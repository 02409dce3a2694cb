//! The embedded store against the conformance suite, and its durability:
//! data survives reopening the file and a writer killed mid-way, and a file
//! from a newer build is refused.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chappe_proto::ids::{ConversationId, MessageId, MessageIdGenerator};
use chappe_storage::{
    ConversationRepo, ConversationRow, CreateMedia, DeviceKeysRow, EmbeddedStore, Error, InboxRepo,
    InboxRow, InsertMessage, KeyRepo, MediaChunkRow, MediaObjectRow, MediaRepo, MemberChange,
    MembershipRow, MessageRepo, MessageRow, OneTimeKeyRow, PresenceSettingsRepo, PutChunk,
    PutDevice, PutFallback, StoredMedia, conformance,
};
use tempfile::TempDir;

fn temp_db() -> (TempDir, PathBuf) {
    let dir = TempDir::new().expect("temporary directory");
    let path = dir.path().join("chappe.db");
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite() {
    let (_dir, path) = temp_db();
    let store = EmbeddedStore::open(&path).expect("open");
    assert_eq!(store.path(), path);
    conformance::run_all(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_runs_twice_at_once_on_one_database() {
    let (_dir, path) = temp_db();
    let store = EmbeddedStore::open(&path).expect("open");
    let first = tokio::spawn(conformance::run_all(store.clone()));
    let second = tokio::spawn(conformance::run_all(store));
    first.await.expect("first run");
    second.await.expect("second run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_survives_reopening() {
    let (_dir, path) = temp_db();
    let device = DeviceKeysRow {
        user_id: "alice".into(),
        device_id: "PHONE".into(),
        curve25519: "curve".into(),
        ed25519: "ed".into(),
        signature: "sig".into(),
        created_at_ms: 1,
        uploaded_at_ms: 2,
    };
    let key = |id: &str| OneTimeKeyRow {
        key_id: id.into(),
        curve25519: format!("curve-{id}"),
        signature: format!("sig-{id}"),
        created_at_ms: 3,
    };
    let id = ConversationId::random();
    let conversation = ConversationRow {
        conversation_id: id,
        kind: 2,
        created_at_ms: 4,
        head: None,
        membership_seq: 1,
    };
    let created = MembershipRow {
        conversation_id: id,
        seq: 1,
        actor_user_id: "alice".into(),
        actor_device_id: "PHONE".into(),
        op: 1,
        target_user_id: "alice".into(),
        at_ms: 4,
        signature: vec![1, 2, 3],
    };
    let ids_gen = MessageIdGenerator::new();
    let message = MessageRow {
        conversation_id: id,
        message_id: ids_gen.next(),
        sender_user_id: "alice".into(),
        sender_device_id: "PHONE".into(),
        client_msg_id: "c1".into(),
        ciphertext: vec![0, 255, 7],
        session_id: "s".into(),
        sent_at_ms: 5,
    };
    let to_device = InboxRow {
        user_id: "bob".into(),
        device_id: "LAPTOP".into(),
        inbox_id: ids_gen.next(),
        sender_user_id: "alice".into(),
        sender_device_id: "PHONE".into(),
        olm_type: 1,
        ciphertext: vec![9; 64],
        sent_at_ms: 6,
    };

    {
        let store = EmbeddedStore::open(&path).expect("open");
        assert_eq!(
            store.put_device(&device).await.expect("put_device"),
            PutDevice::Inserted
        );
        let keys = [key("a"), key("b")];
        assert_eq!(
            store
                .add_one_time_keys("alice", "PHONE", &keys)
                .await
                .expect("add"),
            2
        );
        let stored = store.put_fallback_key("alice", "PHONE", &key("f")).await;
        assert_eq!(stored.expect("put_fallback_key"), PutFallback::Stored);
        let log = [(created.clone(), MemberChange::Add)];
        store
            .create_conversation(&conversation, &log)
            .await
            .expect("create");
        let inserted = store
            .insert_message(&message)
            .await
            .expect("insert_message");
        assert_eq!(inserted, InsertMessage::Inserted);
        let rows = [to_device.clone()];
        assert!(
            store
                .put_to_device("alice", "PHONE", "t1", &rows)
                .await
                .expect("put_to_device")
        );
    }

    let store = EmbeddedStore::open(&path).expect("reopen");
    assert_eq!(
        store.get_device("alice", "PHONE").await.expect("get"),
        Some(device)
    );
    assert_eq!(
        store
            .count_one_time_keys("alice", "PHONE")
            .await
            .expect("count"),
        2
    );
    let claimed = store
        .claim_key("alice", "PHONE")
        .await
        .expect("claim")
        .expect("a key");
    assert_eq!(claimed.key, key("a"));
    let stored = store
        .get_conversation(id)
        .await
        .expect("get")
        .expect("conversation");
    assert_eq!(stored.head, Some(message.message_id));
    assert_eq!(store.members(id).await.expect("members"), ["alice"]);
    assert_eq!(store.membership_log(id).await.expect("log"), [created]);
    let messages = store.messages_after(id, None, 10).await.expect("messages");
    assert_eq!(messages, std::slice::from_ref(&message));
    let retry = store
        .insert_message(&message)
        .await
        .expect("insert_message");
    assert_eq!(
        retry,
        InsertMessage::Duplicate(message),
        "dedup survives too"
    );
    assert_eq!(
        store.inbox("bob", "LAPTOP", 10).await.expect("inbox"),
        [to_device]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_and_presence_settings_survive_reopening() {
    let (_dir, path) = temp_db();
    let conversation = ConversationId::random();
    let object = MediaObjectRow {
        media_id: "0123456789abcdef0123456789abcdef".into(),
        owner_user_id: "alice".into(),
        size: 300_000,
        chunk_size: 256 * 1024,
        chunk_count: 2,
        sha256: vec![7; 32],
        created_at_ms: 1_000,
        expires_at_ms: 2_000,
        complete: false,
    };
    // Chunks of real size: a full one and the rest.
    let chunks: Vec<_> = [256 * 1024, 300_000 - 256 * 1024]
        .into_iter()
        .enumerate()
        .map(|(idx, len)| MediaChunkRow {
            media_id: object.media_id.clone(),
            idx: idx as u32,
            sha256: vec![idx as u8; 32],
            data: vec![idx as u8 + 1; len],
        })
        .collect();
    {
        let store = EmbeddedStore::open(&path).expect("open");
        let created = store.create_object(&object, conversation).await;
        assert!(
            matches!(created, Ok(CreateMedia::Created(_))),
            "{created:?}"
        );
        for (i, chunk) in chunks.iter().enumerate() {
            let put = store.put_chunk(chunk.clone()).await.expect("put_chunk");
            assert_eq!(
                put,
                PutChunk::Stored {
                    stored: i as u32 + 1
                }
            );
        }
        assert!(
            store
                .mark_complete(&object.media_id)
                .await
                .expect("complete")
        );
        store
            .set_hide_last_seen("alice", true)
            .await
            .expect("set_hide_last_seen");
    }

    let store = EmbeddedStore::open(&path).expect("reopen");
    let stored = store
        .get_object(&object.media_id)
        .await
        .expect("get_object")
        .expect("the object");
    assert_eq!(
        stored,
        StoredMedia {
            object: MediaObjectRow {
                complete: true,
                ..object.clone()
            },
            stored_chunks: 2,
        }
    );
    for chunk in &chunks {
        let read = store.get_chunk(&object.media_id, chunk.idx).await;
        assert_eq!(read.expect("get_chunk").as_ref(), Some(chunk));
    }
    assert_eq!(
        store.posts(&object.media_id).await.expect("posts"),
        [conversation]
    );
    assert_eq!(
        store
            .hide_last_seen_many(&["alice", "bob"])
            .await
            .expect("hide_last_seen_many"),
        [true, false]
    );
    assert_eq!(store.delete_expired(2_000, 10).await.expect("sweep"), 1);
    assert_eq!(store.get_object(&object.media_id).await.expect("get"), None);
}

#[test]
fn newer_schema_is_refused() {
    let (_dir, path) = temp_db();
    drop(EmbeddedStore::open(&path).expect("open"));
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    conn.pragma_update(None, "user_version", 99)
        .expect("user_version");
    drop(conn);
    match EmbeddedStore::open(&path) {
        Err(Error::Corrupt { table, detail }) => {
            assert_eq!(table, "schema");
            assert!(
                detail.contains("99") && detail.contains("newer"),
                "{detail}"
            );
        }
        other => panic!("a newer schema must be refused, got {other:?}"),
    }
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let (_dir, path) = temp_db();
    std::fs::write(&path, vec![b'x'; 4096]).expect("write");
    let opened = EmbeddedStore::open(&path);
    assert!(matches!(opened, Err(Error::Corrupt { .. })), "{opened:?}");
}

// ----------------------------------------------------------- crash safety

/// Set in the child of [`killed_writer_loses_no_acknowledged_message`]:
/// the database it writes to.
const WRITER_DB: &str = "CHAPPE_STORAGE_TEST_WRITER_DB";
/// The conversation the child writes to.
const WRITER_CONVERSATION: &str = "CHAPPE_STORAGE_TEST_WRITER_CONVERSATION";
/// Acknowledgements the parent waits for before killing the child.
const ACKS_BEFORE_KILL: usize = 200;
/// A safety net: the child stops on its own after this many messages.
const WRITER_MAX_MESSAGES: usize = 100_000;

/// The test re-runs its own binary as a writer that inserts messages and
/// prints each acknowledged id, kills it with SIGKILL mid-way, and checks
/// that every acknowledged message is in the reopened file.
#[test]
fn killed_writer_loses_no_acknowledged_message() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let (Ok(db), Ok(conversation)) =
        (std::env::var(WRITER_DB), std::env::var(WRITER_CONVERSATION))
    {
        runtime.block_on(write_until_killed(Path::new(&db), &conversation));
        return;
    }

    let (_dir, path) = temp_db();
    let id = runtime.block_on(async {
        let store = EmbeddedStore::open(&path).expect("open");
        let id = ConversationId::random();
        let row = ConversationRow {
            conversation_id: id,
            kind: 2,
            created_at_ms: 0,
            head: None,
            membership_seq: 0,
        };
        store.create_conversation(&row, &[]).await.expect("create");
        id
    });

    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "killed_writer_loses_no_acknowledged_message",
            "--nocapture",
        ])
        .env(WRITER_DB, &path)
        .env(WRITER_CONVERSATION, id.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn writer");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let (lines, acks) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(ack) = line.strip_prefix("ACK ") {
                let _ = lines.send(MessageId::parse(ack).expect("acknowledged id"));
            }
        }
    });

    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match acks.recv_timeout(left) {
            Ok(id) => acked.push(id),
            Err(e) => panic!("writer stopped after {} acknowledgements: {e}", acked.len()),
        }
    }
    child.0.kill().expect("SIGKILL the writer");
    let status = child.0.wait().expect("reap the writer");
    assert!(
        !status.success(),
        "the writer finished before it was killed"
    );
    reader.join().expect("reader thread");
    // Lines the writer printed before it died were acknowledged too.
    acked.extend(acks.try_iter());

    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    drop(conn);
    let store = EmbeddedStore::open(&path).expect("reopen");
    runtime.block_on(async {
        for ack in &acked {
            let found = store.get_message(id, *ack).await.expect("get_message");
            assert!(found.is_some(), "acknowledged message {ack} was lost");
        }
        let head = store
            .get_conversation(id)
            .await
            .expect("get")
            .expect("conversation")
            .head;
        assert!(
            head >= acked.last().copied(),
            "head behind the last acknowledgement"
        );
    });
}

/// The child's side: insert messages one by one, printing each id once
/// the store has acknowledged it.
async fn write_until_killed(db: &Path, conversation: &str) {
    let id = ConversationId::parse(conversation).expect("conversation id");
    let store = EmbeddedStore::open(db).expect("open");
    let ids_gen = MessageIdGenerator::new();
    for i in 0..WRITER_MAX_MESSAGES {
        let row = MessageRow {
            conversation_id: id,
            message_id: ids_gen.next(),
            sender_user_id: "writer".into(),
            sender_device_id: "PHONE".into(),
            client_msg_id: format!("m{i}"),
            ciphertext: vec![7; 256],
            session_id: "s".into(),
            sent_at_ms: 0,
        };
        store.insert_message(&row).await.expect("insert_message");
        println!("ACK {}", row.message_id);
    }
}

/// Kills the writer if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_folded_back_into_the_database_in_the_background() {
    let (_dir, path) = temp_db();
    let store = EmbeddedStore::open(&path).expect("open");
    let before = std::fs::metadata(&path).expect("database file").len();
    // Enough writes to fill many WAL pages; writers never checkpoint.
    for i in 0..300u64 {
        let key = OneTimeKeyRow {
            key_id: format!("k{i}"),
            curve25519: format!("{i:0>43}"),
            signature: "s".repeat(86),
            created_at_ms: 1,
        };
        store
            .add_one_time_keys("wal", "DEVICE", &[key])
            .await
            .expect("stored");
    }
    // The checkpoint thread copies the WAL into the database file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&path).expect("database file").len() <= before {
        assert!(Instant::now() < deadline, "no checkpoint happened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        store.count_one_time_keys("wal", "DEVICE").await.unwrap(),
        300
    );
}
