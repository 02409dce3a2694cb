//! Several in-memory devices wired by hand: a fake keydir, fake inboxes.

use super::*;
use chappe_proto::ids::MessageIdGenerator;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// A keydir, the inboxes and a clock.
struct World {
    keydir: BTreeMap<DeviceAddr, pb::DeviceKeys>,
    one_time: BTreeMap<DeviceAddr, Vec<pb::OneTimeKey>>,
    fallback: BTreeMap<DeviceAddr, pb::OneTimeKey>,
    inboxes: BTreeMap<DeviceAddr, Vec<pb::ToDeviceEvent>>,
    ids: MessageIdGenerator,
    next_inbox: u64,
    now: i64,
}

fn addr(user: &str, device: &str) -> DeviceAddr {
    DeviceAddr::parse(user, device).unwrap()
}

fn users(names: &[&str]) -> BTreeSet<UserId> {
    names.iter().map(|u| UserId::parse(*u).unwrap()).collect()
}

impl World {
    fn new() -> Self {
        Self {
            keydir: BTreeMap::new(),
            one_time: BTreeMap::new(),
            fallback: BTreeMap::new(),
            inboxes: BTreeMap::new(),
            ids: MessageIdGenerator::new(),
            next_inbox: 0,
            now: 1_700_000_000_000,
        }
    }

    /// A new device, its keys published (and their signatures checked as
    /// keydir would).
    fn device(&mut self, user: &str, device: &str) -> Machine {
        let mut m = Machine::new(addr(user, device), self.now, CryptoLimits::default());
        let upload = m.upload_request(Some(0), 10, self.now).unwrap();
        let keys = upload.device_keys.clone().unwrap();
        let verified = Machine::verify_device_keys(&keys).unwrap();
        for k in upload
            .one_time_keys
            .iter()
            .chain(upload.fallback_key.iter())
        {
            let bytes = signing::one_time_key_bytes(
                user,
                device,
                &k.key_id,
                &k.curve25519,
                k.fallback,
                k.created_at_ms,
            );
            let sig = Ed25519Signature::from_base64(&k.signature).unwrap();
            verified.ed25519.verify(&bytes, &sig).unwrap();
        }
        assert_eq!(upload.one_time_keys.len(), 10);
        self.keydir.insert(m.me().clone(), keys);
        self.one_time
            .insert(m.me().clone(), upload.one_time_keys.clone());
        self.fallback
            .insert(m.me().clone(), upload.fallback_key.clone().unwrap());
        m.mark_published();
        assert!(m.upload_request(Some(10), 10, self.now).is_none());
        m
    }

    fn query(&self, m: &mut Machine, members: &[&str]) -> Vec<VerifiedDevice> {
        let wanted = users(members);
        let keys: Vec<_> = self
            .keydir
            .values()
            .filter(|k| wanted.iter().any(|u| u.as_str() == k.user_id))
            .cloned()
            .collect();
        let list = m.observe_devices(&wanted, &keys);
        assert!(list.rejected.is_empty(), "{:?}", list.rejected);
        list.devices
    }

    fn claim(&mut self, d: &DeviceAddr) -> pb::ClaimedKey {
        let key = self
            .one_time
            .get_mut(d)
            .and_then(Vec::pop)
            .unwrap_or_else(|| self.fallback[d].clone());
        pb::ClaimedKey {
            user_id: d.user_id.to_string(),
            device_id: d.device_id.to_string(),
            key: Some(key),
        }
    }

    /// Queues a to-device message as the server would: `sender` is the
    /// authenticated device.
    fn post(&mut self, sender: &DeviceAddr, message: pb::ToDeviceMessage) {
        let recipient = DeviceAddr::from_proto(message.recipient.as_ref()).unwrap();
        self.next_inbox += 1;
        self.inboxes
            .entry(recipient)
            .or_default()
            .push(pb::ToDeviceEvent {
                inbox_id: format!("in{}", self.next_inbox),
                sender: Some(sender.to_proto()),
                olm_type: message.olm_type,
                ciphertext: message.ciphertext,
                sent_at_ms: self.now,
            });
    }

    /// Shares the room key as needed and encrypts `text`, as a client would.
    fn send(
        &mut self,
        sender: &mut Machine,
        conv: &ConversationId,
        members: &[&str],
        text: &str,
    ) -> pb::Message {
        let devices = self.query(sender, members);
        sender.ensure_outbound(conv, &users(members), &devices, self.now);
        let needing = sender.devices_needing_key(conv, &devices);
        for d in sender.devices_without_olm(&needing) {
            let claimed = self.claim(&d.addr);
            sender.create_outbound_olm(&d, &claimed, self.now).unwrap();
        }
        let batch = sender.encrypt_room_keys(conv, &needing, self.now).unwrap();
        assert!(batch.skipped.is_empty());
        let me = sender.me().clone();
        for message in batch.messages {
            self.post(&me, message);
        }
        sender.mark_shared(conv, &batch.session_id, &batch.recipients);
        let out = sender.encrypt_text(conv, text, self.now).unwrap();
        pb::Message {
            conversation_id: conv.to_string(),
            message_id: self.ids.next().to_string(),
            sender: Some(me.to_proto()),
            client_msg_id: format!("{:032x}", rand::random::<u128>()),
            ciphertext: out.ciphertext,
            session_id: out.session_id,
            sent_at_ms: self.now,
        }
    }

    /// Delivers a device's inbox, looking senders up in keydir.
    fn deliver(&mut self, m: &mut Machine) -> Vec<Result<RoomKeyReceived, CryptoError>> {
        let events = self.inboxes.remove(m.me()).unwrap_or_default();
        events
            .into_iter()
            .map(|e| {
                let sender = DeviceAddr::from_proto(e.sender.as_ref()).unwrap();
                let device = match m.known_device(&sender) {
                    Some(d) => d.clone(),
                    None => {
                        let keys = self.keydir[&sender].clone();
                        let list = m.observe_devices(&users(&[sender.user_id.as_str()]), &[keys]);
                        list.devices[0].clone()
                    }
                };
                m.receive_to_device(&sender, &device, e.olm_type, &e.ciphertext, self.now)
            })
            .collect()
    }

    fn deliver_ok(&mut self, m: &mut Machine) {
        for r in self.deliver(m) {
            r.unwrap();
        }
    }
}

fn read(m: &mut Machine, msg: &pb::Message) -> Result<DecryptedMessage, CryptoError> {
    m.decrypt_message(&IncomingMessage::try_from(msg).unwrap())
}

#[test]
fn two_users_with_two_devices_each_read_each_other() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut a2 = w.device("alice", "A2");
    let mut b1 = w.device("bob", "B1");
    let mut b2 = w.device("bob", "B2");
    let conv = ConversationId::random();
    let members = ["alice", "bob"];

    let mut sent = Vec::new();
    for round in 0..3 {
        sent.push(w.send(&mut a1, &conv, &members, &format!("a1 says {round}")));
        sent.push(w.send(&mut b2, &conv, &members, &format!("b2 says {round}")));
        sent.push(w.send(&mut a2, &conv, &members, &format!("a2 says {round}")));
        sent.push(w.send(&mut b1, &conv, &members, &format!("b1 says {round}")));
    }
    for m in [&mut a1, &mut a2, &mut b1, &mut b2] {
        w.deliver_ok(m);
    }
    for msg in &sent {
        for reader in [&mut a1, &mut a2, &mut b1, &mut b2] {
            let got = read(reader, msg).unwrap();
            let sender = DeviceAddr::from_proto(msg.sender.as_ref()).unwrap();
            assert_eq!(got.sender_user, sender.user_id);
            assert_eq!(got.sender_device, sender.device_id);
            assert!(got.body.starts_with(&format!(
                "{}{} says",
                &sender.user_id.as_str()[..1],
                &sender.device_id.as_str()[1..]
            )));
            assert_eq!(got.conversation_id, conv);
        }
    }
    // One session per sender, shared once with each of the three others.
    for m in [&a1, &a2, &b1, &b2] {
        let record = m.outbound_record(&conv).unwrap();
        assert_eq!(record.message_count, 3);
        assert_eq!(record.shared_with.len(), 3);
    }
    // Decrypting again (a message pushed and synced) is fine.
    assert!(read(&mut b1, &sent[0]).is_ok());
}

#[test]
fn olm_sessions_work_in_both_directions_and_survive_pickling() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let conv = ConversationId::random();
    let m1 = w.send(&mut a1, &conv, &["alice", "bob"], "one");
    w.deliver_ok(&mut b1);
    // b1 answers over the session a1 opened (no claim needed).
    let devices = w.query(&mut b1, &["alice", "bob"]);
    assert!(b1.devices_without_olm(&devices).is_empty());

    let json = serde_json::to_string(&a1.pickle()).unwrap();
    let mut a1 = Machine::from_pickle(
        serde_json::from_str(&json).unwrap(),
        CryptoLimits::default(),
    )
    .unwrap();
    let json = serde_json::to_string(&b1.pickle()).unwrap();
    let mut b1 = Machine::from_pickle(
        serde_json::from_str(&json).unwrap(),
        CryptoLimits::default(),
    )
    .unwrap();

    let m2 = w.send(&mut b1, &conv, &["alice", "bob"], "two");
    w.deliver_ok(&mut a1);
    assert_eq!(read(&mut a1, &m2).unwrap().body, "two");
    assert_eq!(read(&mut b1, &m1).unwrap().body, "one");
    let m3 = w.send(&mut a1, &conv, &["alice", "bob"], "three");
    assert_eq!(read(&mut b1, &m3).unwrap().body, "three");
    // Own messages are readable too.
    assert_eq!(read(&mut a1, &m3).unwrap().body, "three");
}

#[test]
fn rotates_after_max_messages_and_max_age() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let conv = ConversationId::random();
    let members = ["alice", "bob"];
    let mut sent = Vec::new();
    for i in 0..100 {
        sent.push(w.send(&mut a1, &conv, &members, &format!("m{i}")));
    }
    let first = a1.outbound_record(&conv).unwrap().session_id.clone();
    assert_eq!(
        a1.rotation_due(&conv, None, None, w.now),
        Some(RotationReason::MessageLimit)
    );
    sent.push(w.send(&mut a1, &conv, &members, "m100"));
    let second = a1.outbound_record(&conv).unwrap().session_id.clone();
    assert_ne!(first, second);
    assert_eq!(a1.outbound_record(&conv).unwrap().message_count, 1);
    w.deliver_ok(&mut b1);
    for (i, msg) in sent.iter().enumerate() {
        assert_eq!(read(&mut b1, msg).unwrap().body, format!("m{i}"));
    }

    w.now += 7 * DAY_MS;
    assert_eq!(
        a1.rotation_due(&conv, None, None, w.now),
        Some(RotationReason::Expired)
    );
    let m = w.send(&mut a1, &conv, &members, "a week later");
    assert_ne!(a1.outbound_record(&conv).unwrap().session_id, second);
    w.deliver_ok(&mut b1);
    assert_eq!(read(&mut b1, &m).unwrap().body, "a week later");
}

#[test]
fn removed_member_cannot_read_after_rotation() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let mut c1 = w.device("carol", "C1");
    let conv = ConversationId::random();
    let before = w.send(&mut a1, &conv, &["alice", "bob", "carol"], "all three");
    w.deliver_ok(&mut b1);
    w.deliver_ok(&mut c1);
    assert!(read(&mut c1, &before).is_ok());
    let old = a1.outbound_record(&conv).unwrap().session_id.clone();

    let devices = w.query(&mut a1, &["alice", "bob"]);
    assert_eq!(
        a1.rotation_due(
            &conv,
            Some(&users(&["alice", "bob"])),
            Some(&devices),
            w.now
        ),
        Some(RotationReason::MemberLeft)
    );
    let after = w.send(&mut a1, &conv, &["alice", "bob"], "carol is gone");
    assert_ne!(after.session_id, old);
    let record = a1.outbound_record(&conv).unwrap();
    assert!(
        !record
            .shared_with
            .keys()
            .any(|d| d.user_id.as_str() == "carol")
    );
    w.deliver_ok(&mut b1);
    assert!(w.inboxes.get(c1.me()).is_none_or(Vec::is_empty));
    assert_eq!(read(&mut b1, &after).unwrap().body, "carol is gone");
    assert!(matches!(
        read(&mut c1, &after),
        Err(CryptoError::MissingRoomKey { .. })
    ));
}

#[test]
fn new_member_gets_the_current_key_but_not_the_past() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let mut d1 = w.device("dave", "D1");
    let conv = ConversationId::random();
    let old = w.send(&mut a1, &conv, &["alice", "bob"], "before dave");
    let session = a1.outbound_record(&conv).unwrap().session_id.clone();
    let new = w.send(&mut a1, &conv, &["alice", "bob", "dave"], "welcome dave");
    // Joining does not rotate.
    assert_eq!(a1.outbound_record(&conv).unwrap().session_id, session);
    w.deliver_ok(&mut b1);
    w.deliver_ok(&mut d1);
    assert_eq!(read(&mut d1, &new).unwrap().body, "welcome dave");
    assert!(matches!(
        read(&mut d1, &old),
        Err(CryptoError::UnknownMessageIndex { .. })
    ));
    assert!(read(&mut b1, &old).is_ok());
}

#[test]
fn pending_messages_are_released_when_their_key_arrives() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let conv = ConversationId::random();
    let msg = w.send(&mut a1, &conv, &["alice", "bob"], "early");
    let incoming = IncomingMessage::try_from(&msg).unwrap();
    assert!(matches!(
        b1.decrypt_message(&incoming),
        Err(CryptoError::MissingRoomKey { .. })
    ));
    assert!(b1.queue_pending(incoming.clone()));
    assert!(b1.queue_pending(incoming));
    assert_eq!(b1.pending_count(), 1);
    let received = w.deliver(&mut b1).pop().unwrap().unwrap();
    assert_eq!(received.conversation_id, conv);
    assert_eq!(received.from, *a1.me());
    assert_eq!(received.released.len(), 1);
    let Released::Decrypted(m) = &received.released[0] else {
        panic!("not released: {:?}", received.released[0]);
    };
    assert_eq!(m.body, "early");
    assert_eq!(b1.pending_count(), 0);
}

/// Builds a room-key payload as `author` would, claiming whatever we like.
#[allow(clippy::too_many_arguments)]
fn forged_room_key(
    author: &mut Machine,
    to: &VerifiedDevice,
    claimed_sender: &VerifiedDevice,
    conv: &ConversationId,
    session: &GroupSession,
    now: i64,
) -> pb::ToDeviceMessage {
    let payload = RoomKeyPayload {
        kind: ROOM_KEY_TYPE.to_owned(),
        sender_user: claimed_sender.addr.user_id.to_string(),
        sender_device: claimed_sender.addr.device_id.to_string(),
        sender_ed25519: claimed_sender.ed25519.to_base64(),
        recipient_user: to.addr.user_id.to_string(),
        recipient_device: to.addr.device_id.to_string(),
        recipient_ed25519: to.ed25519.to_base64(),
        conversation_id: conv.to_string(),
        session_id: session.session_id(),
        session_key: session.session_key().to_base64(),
    };
    let plaintext = serde_json::to_vec(&payload).unwrap();
    author.olm_encrypt(to, &plaintext, now).unwrap()
}

#[test]
fn room_key_from_another_device_than_it_claims_is_refused() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let mut b2 = w.device("bob", "B2");
    let conv = ConversationId::random();
    let members = ["alice", "bob"];
    let devices = w.query(&mut b2, &members);
    let a1_dev = devices.iter().find(|d| d.addr == *a1.me()).unwrap().clone();
    let b1_dev = devices.iter().find(|d| d.addr == *b1.me()).unwrap().clone();
    let claimed = w.claim(b1.me());
    b2.create_outbound_olm(&b1_dev, &claimed, w.now).unwrap();

    // b2 (or anyone holding it) forwards a key claiming to be a1's.
    let session = GroupSession::new(megolm_config());
    let forged = forged_room_key(&mut b2, &b1_dev, &a1_dev, &conv, &session, w.now);
    let b2_addr = b2.me().clone();
    w.post(&b2_addr, forged.clone());
    let results = w.deliver(&mut b1);
    assert!(matches!(results[0], Err(CryptoError::ForgedSender { .. })));

    // The server lies about the sender too: Olm shows it is not a1's key.
    let b2_dev = b1.known_device(&b2_addr).unwrap().clone();
    let a1_known = b1
        .observe_devices(&users(&["alice"]), &[w.keydir[a1.me()].clone()])
        .devices[0]
        .clone();
    let again = forged_room_key(&mut b2, &b1_dev, &a1_dev, &conv, &session, w.now);
    let err = b1
        .receive_to_device(a1.me(), &a1_known, again.olm_type, &again.ciphertext, w.now)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CryptoError::IdentityKeyMismatch { .. } | CryptoError::Olm(_)
        ),
        "{err:?}"
    );
    // Mismatched event sender and device keys are refused outright.
    assert!(matches!(
        b1.receive_to_device(a1.me(), &b2_dev, again.olm_type, &again.ciphertext, w.now),
        Err(CryptoError::ForgedSender { .. })
    ));

    // Nothing was stored: a message in that session stays unreadable.
    let mut fake = GroupSession::from_pickle(session.pickle());
    let payload = serde_json::json!({
        "conversation_id": conv.to_string(), "sender_user": "alice", "sender_device": "A1",
        "sent_at_ms": 0, "content": {"type": "text", "text": "forged"}
    });
    let ct = fake
        .encrypt(serde_json::to_vec(&payload).unwrap())
        .to_bytes();
    let msg = pb::Message {
        conversation_id: conv.to_string(),
        message_id: w.ids.next().to_string(),
        sender: Some(a1.me().to_proto()),
        client_msg_id: "x".into(),
        ciphertext: ct,
        session_id: session.session_id(),
        sent_at_ms: w.now,
    };
    assert!(matches!(
        read(&mut b1, &msg),
        Err(CryptoError::MissingRoomKey { .. })
    ));

    // A key addressed to b2 and delivered to b1 is refused.
    let session2 = GroupSession::new(megolm_config());
    let b2_self = b2.own_device();
    let misaddressed = {
        let payload = RoomKeyPayload {
            kind: ROOM_KEY_TYPE.to_owned(),
            sender_user: "bob".into(),
            sender_device: "B2".into(),
            sender_ed25519: b2_self.ed25519.to_base64(),
            recipient_user: "bob".into(),
            recipient_device: "B2".into(),
            recipient_ed25519: b2_self.ed25519.to_base64(),
            conversation_id: conv.to_string(),
            session_id: session2.session_id(),
            session_key: session2.session_key().to_base64(),
        };
        b2.olm_encrypt(&b1_dev, &serde_json::to_vec(&payload).unwrap(), w.now)
            .unwrap()
    };
    w.post(&b2_addr, misaddressed);
    assert!(matches!(
        w.deliver(&mut b1)[0],
        Err(CryptoError::NotForUs { .. })
    ));
    let _ = &mut a1;
}

#[test]
fn message_relabelled_to_another_sender_is_refused() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let a2 = w.device("alice", "A2");
    let mut b1 = w.device("bob", "B1");
    let conv = ConversationId::random();
    let mut msg = w.send(&mut a1, &conv, &["alice", "bob"], "from a1");
    w.deliver_ok(&mut b1);
    msg.sender = Some(a2.me().to_proto());
    assert!(matches!(
        read(&mut b1, &msg),
        Err(CryptoError::SenderMismatch { .. })
    ));
    msg.sender = Some(addr("bob", "B1").to_proto());
    assert!(matches!(
        read(&mut b1, &msg),
        Err(CryptoError::SenderMismatch { .. })
    ));
}

#[test]
fn ciphertext_replayed_elsewhere_is_refused() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let conv1 = ConversationId::random();
    let conv2 = ConversationId::random();
    let msg = w.send(&mut a1, &conv1, &["alice", "bob"], "for conv1");
    let _other = w.send(&mut a1, &conv2, &["alice", "bob"], "for conv2");
    w.deliver_ok(&mut b1);

    // Into another conversation.
    let mut moved = msg.clone();
    moved.conversation_id = conv2.to_string();
    assert!(matches!(
        read(&mut b1, &moved),
        Err(CryptoError::ConversationMismatch { .. })
    ));

    // Same conversation, under a new message id.
    assert!(read(&mut b1, &msg).is_ok());
    let mut replayed = msg.clone();
    replayed.message_id = w.ids.next().to_string();
    assert!(matches!(
        read(&mut b1, &replayed),
        Err(CryptoError::Replayed { .. })
    ));

    // The plaintext's conversation is checked too: a ciphertext made for
    // conv3 in a session whose key was (then) bound to conv4.
    let conv3 = ConversationId::random();
    let conv4 = ConversationId::random();
    let devices = w.query(&mut a1, &["alice", "bob"]);
    a1.ensure_outbound(&conv3, &users(&["alice", "bob"]), &devices, w.now);
    let session = a1.outbound.remove(&conv3).unwrap();
    a1.outbound.insert(conv4, session);
    let batch = a1.encrypt_room_keys(&conv4, &devices, w.now).unwrap();
    let session = a1.outbound.remove(&conv4).unwrap();
    a1.outbound.insert(conv3, session);
    let out = a1.encrypt_text(&conv3, "made for conv3", w.now).unwrap();
    let me = a1.me().clone();
    for m in batch.messages {
        w.post(&me, m);
    }
    w.deliver_ok(&mut b1);
    let msg = pb::Message {
        conversation_id: conv4.to_string(),
        message_id: w.ids.next().to_string(),
        sender: Some(me.to_proto()),
        client_msg_id: "y".into(),
        ciphertext: out.ciphertext,
        session_id: out.session_id,
        sent_at_ms: w.now,
    };
    assert!(matches!(
        read(&mut b1, &msg),
        Err(CryptoError::ConversationMismatch { .. })
    ));
}

#[test]
fn prekey_message_from_another_identity_is_refused() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let _b2 = w.device("bob", "B2");
    let conv = ConversationId::random();
    w.send(&mut a1, &conv, &["alice", "bob"], "hi");
    // The server files a1's pre-key message for b1 as coming from b2.
    let mut events = w.inboxes.remove(b1.me()).unwrap();
    let event = events.remove(0);
    let b2_keys = w.keydir[&addr("bob", "B2")].clone();
    let b2 = b1.observe_devices(&users(&["bob"]), &[b2_keys]).devices[0].clone();
    assert!(matches!(
        b1.receive_to_device(
            &b2.addr.clone(),
            &b2,
            event.olm_type,
            &event.ciphertext,
            w.now
        ),
        Err(CryptoError::IdentityKeyMismatch { .. })
    ));
}

#[test]
fn device_keys_and_claimed_keys_are_verified() {
    let mut w = World::new();
    let a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let good = w.keydir[a1.me()].clone();
    assert!(Machine::verify_device_keys(&good).is_ok());

    let mut forged = good.clone();
    forged.device_id = "A9".into();
    assert!(matches!(
        Machine::verify_device_keys(&forged),
        Err(CryptoError::BadDeviceKeys { .. })
    ));
    let mut swapped = good.clone();
    swapped.curve25519 = b1.own_device().curve25519.to_base64();
    assert!(Machine::verify_device_keys(&swapped).is_err());
    for field in 0..3 {
        let mut bad = good.clone();
        match field {
            0 => bad.signature = "!!".into(),
            1 => bad.ed25519 = "short".into(),
            _ => bad.curve25519 = String::new(),
        }
        assert!(Machine::verify_device_keys(&bad).is_err());
    }

    // Not asked for, or keys changed since first seen.
    let list = b1.observe_devices(&users(&["carol"]), std::slice::from_ref(&good));
    assert!(list.devices.is_empty() && list.rejected.len() == 1);
    let list = b1.observe_devices(&users(&["alice"]), std::slice::from_ref(&good));
    assert_eq!(list.devices.len(), 1);
    let impostor = Machine::new(addr("alice", "A1"), w.now, CryptoLimits::default());
    let list = b1.observe_devices(&users(&["alice"]), &[impostor.device_keys()]);
    assert!(matches!(
        list.rejected[..],
        [CryptoError::DeviceKeysChanged { .. }]
    ));
    // Our own device with other keys is refused too.
    let me_again = Machine::new(addr("bob", "B1"), w.now, CryptoLimits::default());
    let list = b1.observe_devices(&users(&["bob"]), &[me_again.device_keys()]);
    assert!(list.devices.is_empty());

    // A claimed key must be the device's and signed by it.
    let a1_dev = list_one(&mut b1, &w, "alice");
    let mut claimed = w.claim(a1.me());
    let mut wrong_device = claimed.clone();
    wrong_device.device_id = "A2".into();
    assert!(
        b1.create_outbound_olm(&a1_dev, &wrong_device, w.now)
            .is_err()
    );
    let mut resigned = claimed.clone();
    if let Some(k) = resigned.key.as_mut() {
        k.curve25519 = b1.own_device().curve25519.to_base64();
    }
    assert!(matches!(
        b1.create_outbound_olm(&a1_dev, &resigned, w.now),
        Err(CryptoError::BadOneTimeKey { .. })
    ));
    claimed.key = None;
    assert!(b1.create_outbound_olm(&a1_dev, &claimed, w.now).is_err());
    assert!(!b1.has_olm_session(&a1_dev));
}

fn list_one(m: &mut Machine, w: &World, user: &str) -> VerifiedDevice {
    w.query(m, &[user])[0].clone()
}

#[test]
fn one_time_keys_are_topped_up_below_half() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    assert!(a1.upload_request(Some(5), 10, w.now).is_none());
    let up = a1.upload_request(Some(4), 10, w.now).unwrap();
    assert_eq!(up.one_time_keys.len(), 6);
    assert!(up.fallback_key.is_none());
    // Not marked published: a retry sends the same bytes.
    let again = a1.upload_request(Some(4), 10, w.now + 5).unwrap();
    assert_eq!(up, again);
    a1.mark_published();
    assert!(a1.upload_request(Some(10), 10, w.now).is_none());
}

#[test]
fn garbage_gives_errors_never_panics() {
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let conv = ConversationId::random();
    let good = w.send(&mut a1, &conv, &["alice", "bob"], "real");
    let good_key = w.inboxes.get(b1.me()).unwrap()[0].clone();
    let a1_dev = list_one(&mut b1, &w, "alice");
    let a1_addr = a1.me().clone();

    let mut inputs: Vec<Vec<u8>> = vec![Vec::new(), vec![0], vec![3; 10], vec![0xff; 200]];
    for len in [1usize, 7, 32, 64, 100, 150, 300, 1000] {
        for _ in 0..10 {
            inputs.push((0..len).map(|_| rand::random::<u8>()).collect());
        }
    }
    for cut in [1, 10, good.ciphertext.len() / 2, good.ciphertext.len() - 1] {
        inputs.push(good.ciphertext[..cut].to_vec());
        inputs.push(good_key.ciphertext[..cut.min(good_key.ciphertext.len() - 1)].to_vec());
    }
    for i in (0..good.ciphertext.len()).step_by(7) {
        let mut flipped = good.ciphertext.clone();
        flipped[i] ^= 0x40;
        inputs.push(flipped);
    }
    for i in (0..good_key.ciphertext.len()).step_by(11) {
        let mut flipped = good_key.ciphertext.clone();
        flipped[i] ^= 0x40;
        inputs.push(flipped);
    }
    for bytes in &inputs {
        for olm_type in [0, 1, 2, 99, u32::MAX] {
            assert!(
                b1.receive_to_device(&a1_addr, &a1_dev, olm_type, bytes, w.now)
                    .is_err()
            );
        }
        let mut msg = good.clone();
        msg.ciphertext = bytes.clone();
        msg.message_id = w.ids.next().to_string();
        assert!(read(&mut b1, &msg).is_err());
        msg.session_id = String::from_utf8_lossy(bytes).into_owned();
        assert!(read(&mut b1, &msg).is_err());
    }
    // The genuine ones still work afterwards.
    w.deliver_ok(&mut b1);
    assert_eq!(read(&mut b1, &good).unwrap().body, "real");

    // Malformed envelopes are refused while converting.
    let mut bad = good.clone();
    bad.conversation_id = "nope".into();
    assert!(IncomingMessage::try_from(&bad).is_err());
    let mut bad = good.clone();
    bad.sender = None;
    assert!(IncomingMessage::try_from(&bad).is_err());

    // Valid Olm carrying a payload that is not a room key.
    let b1_dev = list_one(&mut a1, &w, "bob");
    for junk in [
        &b"not json"[..],
        b"{}",
        br#"{"type":"chappe.room_key.v1"}"#,
        b"[1,2]",
    ] {
        let m = a1.olm_encrypt(&b1_dev, junk, w.now).unwrap();
        assert!(
            b1.receive_to_device(&a1_addr, &a1_dev, m.olm_type, &m.ciphertext, w.now)
                .is_err()
        );
    }
    // A room key whose session id does not match its key.
    let session = GroupSession::new(megolm_config());
    let mut payload: serde_json::Value = serde_json::json!({
        "type": ROOM_KEY_TYPE, "sender_user": "alice", "sender_device": "A1",
        "sender_ed25519": a1_dev.ed25519.to_base64(), "recipient_user": "bob",
        "recipient_device": "B1", "recipient_ed25519": b1_dev.ed25519.to_base64(),
        "conversation_id": conv.to_string(), "session_id": "other",
        "session_key": session.session_key().to_base64(),
    });
    let m = a1
        .olm_encrypt(&b1_dev, &serde_json::to_vec(&payload).unwrap(), w.now)
        .unwrap();
    assert!(matches!(
        b1.receive_to_device(&a1_addr, &a1_dev, m.olm_type, &m.ciphertext, w.now),
        Err(CryptoError::MalformedPayload(_))
    ));
    payload["session_id"] = session.session_id().into();
    payload["session_key"] = "AAAA".into();
    let m = a1
        .olm_encrypt(&b1_dev, &serde_json::to_vec(&payload).unwrap(), w.now)
        .unwrap();
    assert!(
        b1.receive_to_device(&a1_addr, &a1_dev, m.olm_type, &m.ciphertext, w.now)
            .is_err()
    );
}

#[test]
fn file_messages_carry_their_attachment_and_text_messages_none() {
    use crate::media::{Attachment, Layout, MediaKey, random_media_id};
    let mut w = World::new();
    let mut a1 = w.device("alice", "A1");
    let mut b1 = w.device("bob", "B1");
    let conv = ConversationId::random();
    let members = ["alice", "bob"];
    let text = w.send(&mut a1, &conv, &members, "here comes a file");
    w.deliver_ok(&mut b1);
    let got = read(&mut b1, &text).unwrap();
    assert_eq!(got.attachment, None);

    let layout = Layout::new(1000, 256).unwrap();
    let attachment = Attachment::new(
        random_media_id(),
        "report.pdf".into(),
        layout,
        MediaKey::random(),
        [9; 32],
    )
    .unwrap();
    let out = a1.encrypt_file(&conv, &attachment, w.now).unwrap();
    let msg = pb::Message {
        conversation_id: conv.to_string(),
        message_id: w.ids.next().to_string(),
        sender: Some(a1.me().to_proto()),
        client_msg_id: "file1".into(),
        ciphertext: out.ciphertext,
        session_id: out.session_id,
        sent_at_ms: w.now,
    };
    let got = read(&mut b1, &msg).unwrap();
    assert_eq!(got.body, "report.pdf");
    assert_eq!(got.attachment.as_ref(), Some(&attachment));
    // The sender reads its own file message too.
    assert_eq!(read(&mut a1, &msg).unwrap().attachment, Some(attachment));
}
