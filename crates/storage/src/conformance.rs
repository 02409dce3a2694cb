//! The conformance suite: behavioural tests that every store must pass, so
//! the embedded store and the ScyllaDB store behave as one.
//!
//! Each test is a public async function generic over the store; [`run_all`]
//! runs them all. Every test makes its own random users and conversations,
//! so the suite can run again, even concurrently, against one database.
//! Failures panic, as tests do; the suite lives in the library (and is
//! always compiled) so that each store's crate can call it from its tests.

use chappe_proto::ids::{ConversationId, MessageId, MessageIdGenerator};

use crate::{
    BUCKET_MS, ClaimedKey, ConversationRow, CreateMedia, DeviceKeysRow, Error, InboxRow,
    InsertMessage, KindCode, MediaChunkRow, MediaObjectRow, MediaUsage, MemberChange,
    MembershipRow, MessageRow, OneTimeKeyRow, OpCode, PutChunk, PutDevice, PutFallback, Result,
    Store, StoredMedia, bucket_of,
};

/// `ConversationKind::Group`.
const KIND_GROUP: KindCode = 2;
/// `MembershipOp::{Create, Add, Remove}`.
const OP_CREATE: OpCode = 1;
const OP_ADD: OpCode = 2;
const OP_REMOVE: OpCode = 3;

/// A fixed clock reading for ids and rows (November 2023).
const T0: u64 = 1_700_000_000_000;

/// Runs every test of the suite against `store`, one after the other.
pub async fn run_all<S: Store + Clone + 'static>(store: S) {
    keys_round_trip(&store).await;
    one_time_key_claims_are_exclusive(&store).await;
    fallback_key_staleness(&store).await;
    device_conflict(&store).await;
    conversation_lifecycle(&store).await;
    membership_seq_conflict(&store).await;
    message_dedup_and_head(&store).await;
    paging_after_and_before(&store).await;
    inbox_dedup_order_and_delete(&store).await;
    media_upload_in_order(&store).await;
    media_object_conflicts_and_posts(&store).await;
    media_usage_and_deletion(&store).await;
    media_expiry(&store).await;
    media_concurrent_chunk_puts(&store).await;
    presence_settings(&store).await;
}

// ---------------------------------------------------------------- keys

/// Devices, one-time keys and the fallback key are stored and read back;
/// an upload is all or nothing.
pub async fn keys_round_trip<S: Store>(store: &S) {
    let user = unique("keys");
    let phone = device_keys(&user, "PHONE", "phone");
    let laptop = device_keys(&user, "LAPTOP", "laptop");
    for device in [&phone, &laptop] {
        assert_eq!(ok(store.put_device(device).await), PutDevice::Inserted);
    }
    assert_eq!(
        ok(store.get_device(&user, "PHONE").await),
        Some(phone.clone())
    );
    assert_eq!(ok(store.get_device(&user, "TABLET").await), None);
    assert_eq!(
        ok(store.list_devices(&user).await),
        [laptop, phone],
        "ordered by device id"
    );
    assert!(ok(store.list_devices(&unique("nobody")).await).is_empty());

    let keys: Vec<_> = (1..=3)
        .map(|i| one_time_key(&format!("k{i}"), 100))
        .collect();
    assert_eq!(ok(store.add_one_time_keys(&user, "PHONE", &keys).await), 3);
    assert_eq!(
        ok(store.add_one_time_keys(&user, "PHONE", &keys).await),
        3,
        "re-adding identical keys is a no-op"
    );
    let mut changed = keys[0].clone();
    changed.curve25519.push_str("-changed");
    let batch = [one_time_key("k4", 100), changed];
    let refused = store.add_one_time_keys(&user, "PHONE", &batch).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    assert_eq!(
        ok(store.count_one_time_keys(&user, "PHONE").await),
        3,
        "a refused upload writes none of its keys"
    );
    assert_eq!(ok(store.count_one_time_keys(&user, "LAPTOP").await), 0);

    let mut claimed = Vec::new();
    for _ in 0..keys.len() {
        let key = ok(store.claim_key(&user, "PHONE").await).expect("a one-time key is left");
        assert!(!key.fallback);
        claimed.push(key.key);
    }
    claimed.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(claimed, keys);
    assert_eq!(
        ok(store.claim_key(&user, "PHONE").await),
        None,
        "no key and no fallback"
    );
    assert_eq!(ok(store.count_one_time_keys(&user, "PHONE").await), 0);

    let fallback = one_time_key("f1", 100);
    assert_eq!(
        ok(store.put_fallback_key(&user, "PHONE", &fallback).await),
        PutFallback::Stored
    );
    for _ in 0..2 {
        let claimed = ok(store.claim_key(&user, "PHONE").await);
        assert_eq!(
            claimed,
            Some(fallback_claim(&fallback)),
            "the fallback key stays"
        );
    }
}

/// Fifty concurrent claims on ten one-time keys: each key goes to exactly
/// one claimer, the other forty get the fallback key.
pub async fn one_time_key_claims_are_exclusive<S: Store + Clone + 'static>(store: &S) {
    const KEYS: usize = 10;
    const CLAIMS: usize = 50;
    const DEVICE: &str = "PHONE";
    let user = unique("claims");
    assert_eq!(
        ok(store.put_device(&device_keys(&user, DEVICE, "phone")).await),
        PutDevice::Inserted
    );
    let keys: Vec<_> = (0..KEYS)
        .map(|i| one_time_key(&format!("k{i:02}"), 1))
        .collect();
    assert_eq!(
        ok(store.add_one_time_keys(&user, DEVICE, &keys).await),
        KEYS as u64
    );
    let fallback = one_time_key("fallback", 1);
    assert_eq!(
        ok(store.put_fallback_key(&user, DEVICE, &fallback).await),
        PutFallback::Stored
    );

    let claims: Vec<_> = (0..CLAIMS)
        .map(|_| {
            let (store, user) = (store.clone(), user.clone());
            tokio::spawn(async move { store.claim_key(&user, DEVICE).await })
        })
        .collect();
    let mut one_time = Vec::new();
    let mut fallbacks = 0;
    for claim in claims {
        let claimed = ok(claim.await.expect("claim task panicked")).expect("a key or the fallback");
        if claimed.fallback {
            assert_eq!(claimed.key, fallback);
            fallbacks += 1;
        } else {
            one_time.push(claimed.key);
        }
    }
    one_time.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(
        one_time, keys,
        "each one-time key is handed out exactly once"
    );
    assert_eq!(fallbacks, CLAIMS - KEYS);
    assert_eq!(ok(store.count_one_time_keys(&user, DEVICE).await), 0);
}

/// A fallback key is replaced by a newer one, never by an older one.
pub async fn fallback_key_staleness<S: Store>(store: &S) {
    let user = unique("fallback");
    let put = |key: OneTimeKeyRow| {
        let user = user.clone();
        async move { ok(store.put_fallback_key(&user, "PHONE", &key).await) }
    };
    let claim = || async { ok(store.claim_key(&user, "PHONE").await) };

    let current = one_time_key("f-100", 100);
    assert_eq!(put(current.clone()).await, PutFallback::Stored);
    assert_eq!(put(current.clone()).await, PutFallback::Unchanged);
    assert_eq!(put(one_time_key("f-50", 50)).await, PutFallback::Stale);
    assert_eq!(
        claim().await,
        Some(fallback_claim(&current)),
        "a stale key is not stored"
    );

    let newer = one_time_key("f-200", 200);
    assert_eq!(put(newer.clone()).await, PutFallback::Stored);
    assert_eq!(claim().await, Some(fallback_claim(&newer)));
}

/// A device's keys are stored once: a re-upload of the same keys is
/// `Unchanged`, other keys are a conflict that leaves the first in place.
pub async fn device_conflict<S: Store>(store: &S) {
    let user = unique("device");
    let stored = device_keys(&user, "PHONE", "first");
    assert_eq!(ok(store.put_device(&stored).await), PutDevice::Inserted);

    let mut again = stored.clone();
    again.uploaded_at_ms += 60_000;
    assert_eq!(ok(store.put_device(&again).await), PutDevice::Unchanged);

    let mut other_curve = stored.clone();
    other_curve.curve25519 = "curve-other".into();
    let mut other_ed = stored.clone();
    other_ed.ed25519 = "ed-other".into();
    for other in [other_curve, other_ed] {
        assert_eq!(
            ok(store.put_device(&other).await),
            PutDevice::Conflict(stored.clone())
        );
    }
    assert_eq!(ok(store.get_device(&user, "PHONE").await), Some(stored));
}

// ------------------------------------------------------- conversations

/// A conversation is created with its log and members, grows and shrinks
/// through appended events, and is listed for its members newest first.
pub async fn conversation_lifecycle<S: Store>(store: &S) {
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let (first, log) = create_group(store, &alice, &[&bob], 1_000).await;
    let expected = ConversationRow {
        conversation_id: first,
        kind: KIND_GROUP,
        created_at_ms: 1_000,
        head: None,
        membership_seq: 2,
    };
    assert_eq!(
        ok(store.get_conversation(first).await),
        Some(expected.clone())
    );
    assert_eq!(ok(store.members(first).await), sorted([&alice, &bob]));
    assert!(ok(store.is_member(first, &bob).await));
    assert!(!ok(store.is_member(first, &carol).await));
    assert_eq!(ok(store.membership_log(first).await), log.clone());

    let log_with_changes: Vec<_> = log.iter().map(|e| (e.clone(), MemberChange::Add)).collect();
    let again = store
        .create_conversation(&expected, &log_with_changes)
        .await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");

    let add = event(first, 3, &alice, OP_ADD, &carol);
    ok(store.append_membership(&add, MemberChange::Add).await);
    let remove = event(first, 4, &alice, OP_REMOVE, &bob);
    ok(store.append_membership(&remove, MemberChange::Remove).await);
    assert_eq!(ok(store.members(first).await), sorted([&alice, &carol]));
    assert!(!ok(store.is_member(first, &bob).await));
    let stored = ok(store.get_conversation(first).await).expect("conversation");
    assert_eq!(stored.membership_seq, 4);
    let seqs: Vec<_> = ok(store.membership_log(first).await)
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);

    // Newest activity first: creation, then the newest message.
    let (second, _) = create_group(store, &alice, &[], 2_000).await;
    assert_eq!(conversation_ids(store, &alice).await, [second, first]);
    let ids_gen = MessageIdGenerator::new();
    let late = message(first, ids_gen.next_at(3_000), &alice, "PHONE", "late");
    assert_eq!(
        ok(store.insert_message(&late).await),
        InsertMessage::Inserted
    );
    assert_eq!(conversation_ids(store, &alice).await, [first, second]);
    assert_eq!(conversation_ids(store, &carol).await, [first]);
    assert!(
        conversation_ids(store, &bob).await.is_empty(),
        "bob was removed"
    );

    let unknown = ConversationId::random();
    assert_eq!(ok(store.get_conversation(unknown).await), None);
    assert!(ok(store.members(unknown).await).is_empty());
    assert!(ok(store.membership_log(unknown).await).is_empty());
    assert!(!ok(store.is_member(unknown, &alice).await));
}

/// Membership events append only at `membership_seq + 1`: of ten writers
/// racing for the next seq exactly one wins.
pub async fn membership_seq_conflict<S: Store + Clone + 'static>(store: &S) {
    let alice = unique("alice");
    let (id, _) = create_group(store, &alice, &[], 1_000).await;
    for seq in [0, 1, 3] {
        let wrong = event(id, seq, &alice, OP_ADD, &unique("wrong"));
        let refused = store.append_membership(&wrong, MemberChange::Add).await;
        assert!(
            matches!(refused, Err(Error::Conflict(_))),
            "seq {seq}: {refused:?}"
        );
    }

    let racers: Vec<_> = (0..10)
        .map(|i| {
            let store = store.clone();
            let row = event(id, 2, &alice, OP_ADD, &format!("{alice}-racer{i}"));
            tokio::spawn(async move {
                let outcome = store.append_membership(&row, MemberChange::Add).await;
                (row.target_user_id, outcome)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        match racer.await.expect("append task panicked") {
            (target, Ok(())) => winners.push(target),
            (_, Err(Error::Conflict(_))) => {}
            (_, Err(e)) => panic!("append_membership failed: {e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one writer gets seq 2: {winners:?}"
    );
    let winner = &winners[0];
    assert_eq!(ok(store.members(id).await), sorted([&alice, winner]));
    let log = ok(store.membership_log(id).await);
    assert_eq!(log.len(), 2);
    assert_eq!(&log[1].target_user_id, winner);
    let stored = ok(store.get_conversation(id).await).expect("conversation");
    assert_eq!(stored.membership_seq, 2);

    let elsewhere = event(ConversationId::random(), 1, &alice, OP_ADD, &alice);
    let refused = store.append_membership(&elsewhere, MemberChange::Add).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
}

// ------------------------------------------------------------ messages

/// A message is stored once per sender device and client id; the head
/// follows the greatest message id.
pub async fn message_dedup_and_head<S: Store>(store: &S) {
    let alice = unique("alice");
    let (id, _) = create_group(store, &alice, &[], 1_000).await;
    let head = || async {
        ok(store.get_conversation(id).await)
            .expect("conversation")
            .head
    };
    let ids_gen = MessageIdGenerator::new();

    let first = message(id, ids_gen.next_at(T0 + 10), &alice, "PHONE", "c1");
    assert_eq!(
        ok(store.insert_message(&first).await),
        InsertMessage::Inserted
    );
    assert_eq!(head().await, Some(first.message_id));
    assert_eq!(
        ok(store.get_message(id, first.message_id).await),
        Some(first.clone())
    );

    let mut retry = message(id, ids_gen.next_at(T0 + 20), &alice, "PHONE", "c1");
    retry.ciphertext = b"retry".to_vec();
    assert_eq!(
        ok(store.insert_message(&retry).await),
        InsertMessage::Duplicate(first.clone())
    );
    assert_eq!(
        ok(store.get_message(id, retry.message_id).await),
        None,
        "nothing written"
    );
    assert_eq!(head().await, Some(first.message_id));

    // The client id is scoped to the sending device.
    let laptop = message(id, ids_gen.next_at(T0 + 30), &alice, "LAPTOP", "c1");
    assert_eq!(
        ok(store.insert_message(&laptop).await),
        InsertMessage::Inserted
    );
    assert_eq!(head().await, Some(laptop.message_id));

    // An older message is stored but does not move the head back.
    let older = message(
        id,
        MessageIdGenerator::new().next_at(T0),
        &alice,
        "PHONE",
        "c0",
    );
    assert_eq!(
        ok(store.insert_message(&older).await),
        InsertMessage::Inserted
    );
    assert_eq!(head().await, Some(laptop.message_id));
    assert_eq!(
        ok(store.get_message(id, older.message_id).await),
        Some(older)
    );

    // ... and to the conversation.
    let (other, _) = create_group(store, &alice, &[], 1_000).await;
    let elsewhere = message(other, ids_gen.next_at(T0 + 40), &alice, "PHONE", "c1");
    assert_eq!(
        ok(store.insert_message(&elsewhere).await),
        InsertMessage::Inserted
    );
    assert_eq!(ok(store.get_message(id, elsewhere.message_id).await), None);
}

/// Paging forward and backward with exclusive bounds and limits, across
/// two time buckets, sees only the conversation's own messages.
pub async fn paging_after_and_before<S: Store>(store: &S) {
    let alice = unique("alice");
    let (id, _) = create_group(store, &alice, &[], 1_000).await;
    let (other, _) = create_group(store, &alice, &[], 1_000).await;
    let ids_gen = MessageIdGenerator::new();
    let times = (0..5)
        .map(|i| T0 + i)
        .chain((0..5).map(|i| T0 + BUCKET_MS + i));
    let rows: Vec<_> = times
        .enumerate()
        .map(|(i, ms)| message(id, ids_gen.next_at(ms), &alice, "PHONE", &format!("m{i}")))
        .collect();
    let ids: Vec<_> = rows.iter().map(|r| r.message_id).collect();
    assert_ne!(bucket_of(ids[4]), bucket_of(ids[5]), "two buckets");
    for i in [7, 2, 9, 0, 5, 3, 8, 1, 6, 4] {
        assert_eq!(
            ok(store.insert_message(&rows[i]).await),
            InsertMessage::Inserted
        );
    }
    let noise = message(other, ids_gen.next_at(T0 + 2), &alice, "PHONE", "noise");
    assert_eq!(
        ok(store.insert_message(&noise).await),
        InsertMessage::Inserted
    );

    let after = |bound: Option<MessageId>, limit| async move {
        message_ids(ok(store.messages_after(id, bound, limit).await))
    };
    let before = |bound: Option<MessageId>, limit| async move {
        message_ids(ok(store.messages_before(id, bound, limit).await))
    };

    assert_eq!(
        ok(store.messages_after(id, None, 100).await),
        rows,
        "all, oldest first"
    );
    assert_eq!(after(None, 3).await, ids[..3]);
    assert_eq!(
        after(Some(ids[2]), 4).await,
        ids[3..7],
        "across the buckets"
    );
    assert_eq!(
        after(Some(MessageId::floor(T0 + 100)), 2).await,
        ids[5..7],
        "unstored bound"
    );
    assert!(after(Some(ids[9]), 10).await.is_empty());
    assert!(after(None, 0).await.is_empty());

    let newest_first: Vec<_> = ids.iter().rev().copied().collect();
    assert_eq!(before(None, 100).await, newest_first, "all, newest first");
    assert_eq!(before(None, 3).await, newest_first[..3]);
    assert_eq!(
        before(Some(ids[6]), 3).await,
        [ids[5], ids[4], ids[3]],
        "across the buckets"
    );
    assert_eq!(
        before(Some(MessageId::floor(T0 + BUCKET_MS)), 2).await,
        [ids[4], ids[3]]
    );
    assert!(before(Some(ids[0]), 10).await.is_empty());
    assert!(before(None, 0).await.is_empty());
}

// --------------------------------------------------------------- inbox

/// To-device batches are stored once per sender device and client id, read
/// oldest first per device, and deleted by id.
pub async fn inbox_dedup_order_and_delete<S: Store>(store: &S) {
    let (user, sender) = (unique("rcpt"), unique("sender"));
    let ids_gen = MessageIdGenerator::new();
    let ids: Vec<_> = (0..5).map(|i| ids_gen.next_at(T0 + i)).collect();
    let entry = |i: usize, device: &str, sender_device: &str| InboxRow {
        user_id: user.clone(),
        device_id: device.into(),
        inbox_id: ids[i],
        sender_user_id: sender.clone(),
        sender_device_id: sender_device.into(),
        olm_type: (i % 2) as u32,
        ciphertext: format!("olm-{i}").into_bytes(),
        sent_at_ms: (T0 + i as u64) as i64,
    };
    let put = |sender_device: &'static str, client_msg_id: &'static str, rows: Vec<InboxRow>| {
        let sender = sender.clone();
        async move {
            ok(store
                .put_to_device(&sender, sender_device, client_msg_id, &rows)
                .await)
        }
    };
    let inbox = |device: &'static str, limit| {
        let user = user.clone();
        async move { ok(store.inbox(&user, device, limit).await) }
    };

    let batch = vec![
        entry(2, "PHONE", "S1"),
        entry(0, "PHONE", "S1"),
        entry(1, "LAPTOP", "S1"),
    ];
    assert!(put("S1", "batch-1", batch).await);
    assert!(
        !put("S1", "batch-1", vec![entry(4, "PHONE", "S1")]).await,
        "a retried batch is refused"
    );
    assert!(put("S1", "batch-2", vec![entry(3, "PHONE", "S1")]).await);
    assert!(
        put("S2", "batch-1", vec![entry(4, "PHONE", "S2")]).await,
        "the client id is scoped to the sending device"
    );

    let phone = [
        entry(0, "PHONE", "S1"),
        entry(2, "PHONE", "S1"),
        entry(3, "PHONE", "S1"),
        entry(4, "PHONE", "S2"),
    ];
    assert_eq!(inbox("PHONE", 100).await, phone, "oldest first");
    assert_eq!(inbox("PHONE", 2).await, phone[..2]);
    assert_eq!(inbox("LAPTOP", 100).await, [entry(1, "LAPTOP", "S1")]);

    let unknown = MessageIdGenerator::new().next_at(T0);
    // ids[1] is the laptop's: not deleted from the phone's inbox.
    let removed = ok(store
        .delete_inbox(&user, "PHONE", &[ids[0], ids[1], unknown])
        .await);
    assert_eq!(removed, 1);
    assert_eq!(ok(store.delete_inbox(&user, "PHONE", &[ids[0]]).await), 0);
    assert_eq!(ok(store.delete_inbox(&user, "PHONE", &[]).await), 0);
    assert_eq!(inbox("PHONE", 100).await, phone[1..]);
    assert_eq!(inbox("LAPTOP", 100).await, [entry(1, "LAPTOP", "S1")]);
}

// --------------------------------------------------------------- media

/// An expiry no run of the suite ever reaches, so that [`media_expiry`]
/// (which deletes everything expired at its time, whoever made it) leaves
/// the other tests' objects alone.
const NEVER: i64 = i64::MAX / 2;

/// A fresh media id: 32 lowercase hex digits.
fn media_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn media_object(owner: &str, size: u64, chunk_size: u32, created_at_ms: i64) -> MediaObjectRow {
    MediaObjectRow {
        media_id: media_id(),
        owner_user_id: owner.into(),
        size,
        chunk_size,
        chunk_count: size.div_ceil(u64::from(chunk_size)) as u32,
        sha256: format!("whole-{owner}-{size}").into_bytes(),
        created_at_ms,
        expires_at_ms: NEVER,
        complete: false,
    }
}

fn chunk(media_id: &str, idx: u32, tag: &str) -> MediaChunkRow {
    MediaChunkRow {
        media_id: media_id.into(),
        idx,
        sha256: format!("hash-{idx}-{tag}").into_bytes(),
        data: format!("data-{idx}-{tag}").into_bytes(),
    }
}

async fn stored_chunks<S: Store>(store: &S, media_id: &str) -> Option<u32> {
    ok(store.get_object(media_id).await).map(|m| m.stored_chunks)
}

/// Chunks are stored only in order: the next index is stored, one stored
/// already is `Unchanged` with the same hash and a `Conflict` with
/// another, any other index is `OutOfOrder`; none of those writes. The
/// object completes only once every chunk is stored.
pub async fn media_upload_in_order<S: Store>(store: &S) {
    let owner = unique("uploader");
    let (conversation, _) = create_group(store, &owner, &[], 1_000).await;
    let object = media_object(&owner, 10, 4, 5_000);
    let id = object.media_id.clone();
    let created = ok(store.create_object(&object, conversation).await);
    let fresh = StoredMedia {
        object: object.clone(),
        stored_chunks: 0,
    };
    assert_eq!(created, CreateMedia::Created(fresh.clone()));
    assert_eq!(ok(store.get_object(&id).await), Some(fresh));
    assert_eq!(ok(store.get_object(&media_id()).await), None);

    assert_eq!(
        ok(store.put_chunk(chunk(&id, 1, "a")).await),
        PutChunk::OutOfOrder { stored: 0 },
        "chunk 0 comes first"
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 0, "a")).await),
        PutChunk::Stored { stored: 1 }
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 0, "a")).await),
        PutChunk::Unchanged { stored: 1 }
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 0, "b")).await),
        PutChunk::Conflict { stored: 1 }
    );
    assert_eq!(
        ok(store.get_chunk(&id, 0).await),
        Some(chunk(&id, 0, "a")),
        "a conflicting chunk does not replace the stored one"
    );
    assert!(
        !ok(store.mark_complete(&id).await),
        "an object with missing chunks cannot complete"
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 2, "a")).await),
        PutChunk::OutOfOrder { stored: 1 }
    );
    assert_eq!(ok(store.get_chunk(&id, 2).await), None);
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 1, "a")).await),
        PutChunk::Stored { stored: 2 }
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 2, "a")).await),
        PutChunk::Stored { stored: 3 }
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 3, "a")).await),
        PutChunk::OutOfOrder { stored: 3 },
        "the object has 3 chunks"
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&media_id(), 0, "a")).await),
        PutChunk::UnknownObject
    );
    for idx in 0..3 {
        assert_eq!(
            ok(store.get_chunk(&id, idx).await),
            Some(chunk(&id, idx, "a"))
        );
    }

    assert!(ok(store.mark_complete(&id).await));
    assert!(ok(store.mark_complete(&id).await), "again is harmless");
    assert!(!ok(store.mark_complete(&media_id()).await));
    let complete = MediaObjectRow {
        complete: true,
        ..object
    };
    assert_eq!(
        ok(store.get_object(&id).await),
        Some(StoredMedia {
            object: complete,
            stored_chunks: 3
        })
    );
}

/// A media id belongs to one upload: the same upload again is `Existing`
/// (with what is stored, and its post recorded), another owner or other
/// fields are a `Conflict` that writes nothing. Posts list each
/// conversation once.
pub async fn media_object_conflicts_and_posts<S: Store>(store: &S) {
    let (owner, other) = (unique("owner"), unique("other"));
    let (first, _) = create_group(store, &owner, &[&other], 1_000).await;
    let (second, _) = create_group(store, &owner, &[], 1_000).await;
    let (third, _) = create_group(store, &other, &[], 1_000).await;
    let object = media_object(&owner, 8, 4, 5_000);
    let id = object.media_id.clone();
    assert!(matches!(
        ok(store.create_object(&object, first).await),
        CreateMedia::Created(_)
    ));
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 0, "a")).await),
        PutChunk::Stored { stored: 1 }
    );

    // Resumed later, from another conversation: the times stay the first.
    let resumed = MediaObjectRow {
        created_at_ms: 9_000,
        expires_at_ms: NEVER - 1,
        ..object.clone()
    };
    assert_eq!(
        ok(store.create_object(&resumed, second).await),
        CreateMedia::Existing(StoredMedia {
            object: object.clone(),
            stored_chunks: 1
        })
    );

    let others = [
        MediaObjectRow {
            owner_user_id: other.clone(),
            ..object.clone()
        },
        MediaObjectRow {
            size: 9,
            chunk_count: 3,
            ..object.clone()
        },
        MediaObjectRow {
            chunk_size: 8,
            chunk_count: 1,
            ..object.clone()
        },
        MediaObjectRow {
            sha256: b"another hash".to_vec(),
            ..object.clone()
        },
    ];
    for conflicting in others {
        assert_eq!(
            ok(store.create_object(&conflicting, third).await),
            CreateMedia::Conflict,
            "{conflicting:?}"
        );
    }
    let mut expected = vec![first, second];
    expected.sort();
    assert_eq!(
        ok(store.posts(&id).await),
        expected,
        "a conflicting create records no post"
    );
    assert_eq!(
        ok(store.get_object(&id).await),
        Some(StoredMedia {
            object,
            stored_chunks: 1
        })
    );

    assert!(ok(store.add_post(&id, third).await));
    assert!(ok(store.add_post(&id, third).await), "again is a no-op");
    expected.push(third);
    expected.sort();
    assert_eq!(ok(store.posts(&id).await), expected);
    assert!(!ok(store.add_post(&media_id(), third).await));
    assert!(ok(store.posts(&media_id()).await).is_empty());
}

/// An owner's usage lists their objects created since a time, oldest
/// first; deleting an object deletes its chunks and posts and takes it out
/// of the usage.
pub async fn media_usage_and_deletion<S: Store>(store: &S) {
    let (owner, other) = (unique("owner"), unique("other"));
    let (conversation, _) = create_group(store, &owner, &[&other], 1_000).await;
    let late = media_object(&owner, 300, 100, 30_000);
    let early = media_object(&owner, 100, 100, 10_000);
    let middle = media_object(&owner, 200, 100, 20_000);
    let theirs = media_object(&other, 1_000, 100, 20_000);
    for object in [&late, &early, &middle, &theirs] {
        assert!(matches!(
            ok(store.create_object(object, conversation).await),
            CreateMedia::Created(_)
        ));
    }
    let usage = |o: &MediaObjectRow| MediaUsage {
        media_id: o.media_id.clone(),
        created_at_ms: o.created_at_ms,
        size: o.size,
    };
    assert_eq!(
        ok(store.usage_since(&owner, 0).await),
        [usage(&early), usage(&middle), usage(&late)]
    );
    assert_eq!(
        ok(store.usage_since(&owner, 20_000).await),
        [usage(&middle), usage(&late)],
        "created at the time counts"
    );
    assert!(ok(store.usage_since(&owner, 30_001).await).is_empty());
    assert!(ok(store.usage_since(&unique("nobody"), 0).await).is_empty());

    let id = middle.media_id.clone();
    for idx in 0..2 {
        assert_eq!(
            ok(store.put_chunk(chunk(&id, idx, "a")).await),
            PutChunk::Stored { stored: idx + 1 }
        );
    }
    assert!(ok(store.delete_object(&id).await));
    assert!(!ok(store.delete_object(&id).await), "deleted already");
    assert_eq!(ok(store.get_object(&id).await), None);
    assert_eq!(ok(store.get_chunk(&id, 0).await), None);
    assert_eq!(ok(store.get_chunk(&id, 1).await), None);
    assert!(ok(store.posts(&id).await).is_empty());
    assert_eq!(
        ok(store.usage_since(&owner, 0).await),
        [usage(&early), usage(&late)]
    );
    assert_eq!(
        ok(store.put_chunk(chunk(&id, 2, "a")).await),
        PutChunk::UnknownObject
    );

    // The id is free again, and starts from nothing.
    let again = MediaObjectRow {
        created_at_ms: 40_000,
        ..middle
    };
    assert_eq!(
        ok(store.create_object(&again, conversation).await),
        CreateMedia::Created(StoredMedia {
            object: again.clone(),
            stored_chunks: 0
        })
    );
    assert_eq!(ok(store.posts(&id).await), [conversation]);
}

/// Objects expired at a time are deleted with their chunks and posts, at
/// most `limit` per call; the others stay. A call deletes every object
/// expired at its time, whoever wrote it (another run of the suite may
/// delete this one's), so this test checks its own rows rather than counts.
pub async fn media_expiry<S: Store>(store: &S) {
    const NOW: i64 = 1_000_000;
    let owner = unique("expiry");
    let (conversation, _) = create_group(store, &owner, &[], 1_000).await;
    let mut expired = Vec::new();
    for expires_at_ms in [NOW - 10, NOW - 5, NOW] {
        let object = MediaObjectRow {
            expires_at_ms,
            ..media_object(&owner, 10, 10, 1_000)
        };
        assert!(matches!(
            ok(store.create_object(&object, conversation).await),
            CreateMedia::Created(_)
        ));
        match ok(store.put_chunk(chunk(&object.media_id, 0, "a")).await) {
            PutChunk::Stored { stored: 1 } => {}
            // Expired already: another run of the suite, sweeping at the
            // same time, may have deleted it.
            PutChunk::UnknownObject => {}
            other => panic!("{other:?}"),
        }
        expired.push(object.media_id);
    }
    let live = MediaObjectRow {
        expires_at_ms: NOW + 1,
        ..media_object(&owner, 10, 10, 1_000)
    };
    assert!(matches!(
        ok(store.create_object(&live, conversation).await),
        CreateMedia::Created(_)
    ));
    assert_eq!(
        ok(store.put_chunk(chunk(&live.media_id, 0, "a")).await),
        PutChunk::Stored { stored: 1 }
    );

    assert!(
        ok(store.delete_expired(NOW, 1).await) <= 1,
        "at most `limit` per call"
    );
    let mut rounds = 0;
    while ok(store.delete_expired(NOW, 2).await) > 0 {
        rounds += 1;
        assert!(rounds < 1_000, "delete_expired never runs out");
    }
    for id in &expired {
        assert_eq!(ok(store.get_object(id).await), None);
        assert_eq!(ok(store.get_chunk(id, 0).await), None);
        assert!(ok(store.posts(id).await).is_empty());
    }
    assert_eq!(stored_chunks(store, &live.media_id).await, Some(1));
    assert_eq!(ok(store.posts(&live.media_id).await), [conversation]);
    assert_eq!(
        ok(store.usage_since(&owner, 0).await)
            .into_iter()
            .map(|u| u.media_id)
            .collect::<Vec<_>>(),
        [live.media_id]
    );
}

/// Many writers racing on the same chunks: each index is stored once, and
/// the object ends up with every chunk, in order.
pub async fn media_concurrent_chunk_puts<S: Store + Clone + 'static>(store: &S) {
    const CHUNKS: u32 = 8;
    const WRITERS: usize = 4;
    let owner = unique("racer");
    let (conversation, _) = create_group(store, &owner, &[], 1_000).await;
    let object = media_object(&owner, u64::from(CHUNKS) * 4, 4, 1_000);
    let id = object.media_id.clone();
    assert!(matches!(
        ok(store.create_object(&object, conversation).await),
        CreateMedia::Created(_)
    ));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move {
                let mut stored_by_me = 0;
                let mut idx = 0;
                while idx < CHUNKS {
                    match store.put_chunk(chunk(&id, idx, "a")).await {
                        Ok(PutChunk::Stored { .. }) => {
                            stored_by_me += 1;
                            idx += 1;
                        }
                        Ok(PutChunk::Unchanged { .. }) => idx += 1,
                        Ok(PutChunk::OutOfOrder { stored }) => idx = stored,
                        other => panic!("chunk {idx}: {other:?}"),
                    }
                }
                stored_by_me
            })
        })
        .collect();
    let mut total = 0;
    for writer in writers {
        total += writer.await.expect("writer panicked");
    }
    assert_eq!(total, CHUNKS, "each chunk is stored by exactly one writer");
    assert_eq!(stored_chunks(store, &id).await, Some(CHUNKS));
    for idx in 0..CHUNKS {
        assert_eq!(
            ok(store.get_chunk(&id, idx).await),
            Some(chunk(&id, idx, "a"))
        );
    }
}

// ------------------------------------------------------------ presence

/// A user's choice to hide last-seen is kept until changed; users who never
/// chose do not hide it; answers come in the order asked.
pub async fn presence_settings<S: Store>(store: &S) {
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    assert_eq!(
        ok(store
            .hide_last_seen_many(&[alice.as_str(), bob.as_str()])
            .await),
        [false, false]
    );
    assert!(ok(store.hide_last_seen_many(&[]).await).is_empty());
    ok(store.set_hide_last_seen(&alice, true).await);
    ok(store.set_hide_last_seen(&carol, false).await);
    assert_eq!(
        ok(store
            .hide_last_seen_many(&[bob.as_str(), alice.as_str(), carol.as_str(), alice.as_str()])
            .await),
        [false, true, false, true]
    );
    ok(store.set_hide_last_seen(&alice, true).await);
    assert_eq!(
        ok(store.hide_last_seen_many(&[alice.as_str()]).await),
        [true]
    );
    ok(store.set_hide_last_seen(&alice, false).await);
    ok(store.set_hide_last_seen(&bob, true).await);
    assert_eq!(
        ok(store
            .hide_last_seen_many(&[alice.as_str(), bob.as_str()])
            .await),
        [false, true]
    );
}

// ------------------------------------------------------------- helpers

/// The value of a store call that must succeed.
#[track_caller]
fn ok<T>(result: Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("store call failed: {e}"),
    }
}

/// A fresh name, so runs never meet each other's rows.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn sorted<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut names: Vec<_> = names.into_iter().cloned().collect();
    names.sort();
    names
}

fn device_keys(user: &str, device: &str, tag: &str) -> DeviceKeysRow {
    DeviceKeysRow {
        user_id: user.into(),
        device_id: device.into(),
        curve25519: format!("curve-{tag}"),
        ed25519: format!("ed-{tag}"),
        signature: format!("sig-{tag}"),
        created_at_ms: 1_000,
        uploaded_at_ms: 2_000,
    }
}

fn one_time_key(key_id: &str, created_at_ms: i64) -> OneTimeKeyRow {
    OneTimeKeyRow {
        key_id: key_id.into(),
        curve25519: format!("curve-{key_id}"),
        signature: format!("sig-{key_id}"),
        created_at_ms,
    }
}

fn fallback_claim(key: &OneTimeKeyRow) -> ClaimedKey {
    ClaimedKey {
        key: key.clone(),
        fallback: true,
    }
}

fn event(id: ConversationId, seq: u64, actor: &str, op: OpCode, target: &str) -> MembershipRow {
    MembershipRow {
        conversation_id: id,
        seq,
        actor_user_id: actor.into(),
        actor_device_id: "PHONE".into(),
        op,
        target_user_id: target.into(),
        at_ms: 1_000 + seq as i64,
        signature: format!("sig-{seq}-{target}").into_bytes(),
    }
}

/// Creates a group of `creator` and `others` (seq 1 the creation, then one
/// add each); returns its id and log.
async fn create_group<S: Store>(
    store: &S,
    creator: &str,
    others: &[&str],
    created_at_ms: i64,
) -> (ConversationId, Vec<MembershipRow>) {
    let id = ConversationId::random();
    let mut log = vec![event(id, 1, creator, OP_CREATE, creator)];
    for (seq, other) in (2..).zip(others) {
        log.push(event(id, seq, creator, OP_ADD, other));
    }
    let row = ConversationRow {
        conversation_id: id,
        kind: KIND_GROUP,
        created_at_ms,
        head: None,
        membership_seq: log.len() as u64,
    };
    let changes: Vec<_> = log.iter().map(|e| (e.clone(), MemberChange::Add)).collect();
    ok(store.create_conversation(&row, &changes).await);
    (id, log)
}

fn message(
    id: ConversationId,
    message_id: MessageId,
    sender: &str,
    device: &str,
    client_msg_id: &str,
) -> MessageRow {
    MessageRow {
        conversation_id: id,
        message_id,
        sender_user_id: sender.into(),
        sender_device_id: device.into(),
        client_msg_id: client_msg_id.into(),
        ciphertext: format!("ciphertext-{message_id}").into_bytes(),
        session_id: "megolm-session".into(),
        sent_at_ms: message_id.timestamp_ms() as i64,
    }
}

fn message_ids(rows: Vec<MessageRow>) -> Vec<MessageId> {
    rows.into_iter().map(|r| r.message_id).collect()
}

async fn conversation_ids<S: Store>(store: &S, user: &str) -> Vec<ConversationId> {
    let rows = ok(store.conversations_of(user).await);
    rows.into_iter().map(|c| c.conversation_id).collect()
}
