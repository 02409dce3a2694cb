//! An in-memory stand-in for the gateway, speaking `chappe.v1` over real
//! gRPC on a loopback port, just faithful enough to exercise the SDK:
//! dev login, keydir (device keys verified), conversations, the `Connect`
//! stream (sends deduplicated by client_msg_id, to-device inboxes kept until
//! acknowledged, sync with cursors, pushes), and history. Test hooks: kick a
//! device's stream, lose the answer of the next send.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chappe_client::crypto::Machine;
use chappe_proto::ids::{ConversationId, MessageIdGenerator};
use chappe_proto::v1::{
    self as pb, auth_server::AuthServer, client_frame, gateway_server::GatewayServer, server_frame,
};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

type Key = (String, String);
type Out = mpsc::Sender<Result<pb::ServerFrame, Status>>;

#[derive(Default)]
struct Db {
    tokens: HashMap<String, Key>,
    devices: BTreeMap<Key, pb::DeviceKeys>,
    otks: BTreeMap<Key, Vec<pb::OneTimeKey>>,
    fallback: BTreeMap<Key, pb::OneTimeKey>,
    conversations: BTreeMap<String, pb::Conversation>,
    messages: BTreeMap<String, Vec<pb::Message>>,
    sent: HashMap<(Key, String), pb::SendResult>,
    to_device_batches: HashSet<(Key, String)>,
    inboxes: BTreeMap<Key, Vec<pb::ToDeviceEvent>>,
    streams: HashMap<Key, Vec<(u64, Out)>>,
    next_conn: u64,
}

#[derive(Clone)]
pub struct FakeGateway {
    db: Arc<Mutex<Db>>,
    ids: Arc<MessageIdGenerator>,
    lose_next_send_answer: Arc<AtomicBool>,
    pub stored_sends: Arc<AtomicU64>,
    pub to_device_messages: Arc<AtomicU64>,
}

pub struct Running {
    pub url: String,
    pub gateway: FakeGateway,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start() -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let gateway = FakeGateway {
        db: Arc::default(),
        ids: Arc::new(MessageIdGenerator::new()),
        lose_next_send_answer: Arc::default(),
        stored_sends: Arc::default(),
        to_device_messages: Arc::default(),
    };
    let (tx, rx) = oneshot::channel();
    let server = tonic::transport::Server::builder()
        .add_service(AuthServer::new(gateway.clone()))
        .add_service(GatewayServer::new(gateway.clone()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = rx.await;
        });
    tokio::spawn(server);
    Running {
        url: format!("http://{addr}"),
        gateway,
        shutdown: Some(tx),
    }
}

fn key(r: &pb::DeviceRef) -> Key {
    (r.user_id.clone(), r.device_id.clone())
}

fn dref(k: &Key) -> pb::DeviceRef {
    pb::DeviceRef {
        user_id: k.0.clone(),
        device_id: k.1.clone(),
    }
}

impl FakeGateway {
    fn who<T>(&self, req: &Request<T>) -> Result<Key, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no token"))?;
        self.db
            .lock()
            .unwrap()
            .tokens
            .get(header)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// Ends every `Connect` stream of a device with UNAVAILABLE.
    pub fn kick(&self, user: &str, device: &str) {
        let streams = self
            .db
            .lock()
            .unwrap()
            .streams
            .remove(&(user.to_owned(), device.to_owned()))
            .unwrap_or_default();
        for (_, out) in streams {
            let _ = out.try_send(Err(Status::unavailable("kicked")));
        }
    }

    /// Forgets all session tokens (as if they expired).
    pub fn expire_tokens(&self) {
        self.db.lock().unwrap().tokens.clear();
    }

    /// The next send is stored but its answer is never sent.
    pub fn lose_next_send_answer(&self) {
        self.lose_next_send_answer.store(true, Ordering::SeqCst);
    }

    pub fn inbox_len(&self, user: &str, device: &str) -> usize {
        self.db
            .lock()
            .unwrap()
            .inboxes
            .get(&(user.to_owned(), device.to_owned()))
            .map_or(0, Vec::len)
    }

    pub fn message_count(&self, conv: &str) -> usize {
        self.db
            .lock()
            .unwrap()
            .messages
            .get(conv)
            .map_or(0, Vec::len)
    }

    pub fn one_time_key_count(&self, user: &str, device: &str) -> usize {
        self.db
            .lock()
            .unwrap()
            .otks
            .get(&(user.to_owned(), device.to_owned()))
            .map_or(0, Vec::len)
    }

    fn member(db: &Db, conv: &str, user: &str) -> Result<pb::Conversation, Status> {
        let c = db
            .conversations
            .get(conv)
            .ok_or_else(|| Status::not_found("no such conversation"))?;
        if !c.member_user_ids.iter().any(|m| m == user) {
            return Err(Status::permission_denied("not a member"));
        }
        Ok(c.clone())
    }

    fn push_to(db: &Db, target: &Key, frame: pb::ServerFrame) {
        for (_, out) in db.streams.get(target).into_iter().flatten() {
            let _ = out.try_send(Ok(frame.clone()));
        }
    }

    fn handle(&self, me: &Key, frame: pb::ClientFrame) -> Option<pb::ServerFrame> {
        use client_frame::Body as C;
        use server_frame::Body as S;
        let request_id = frame.request_id;
        let answer = |body| {
            Some(pb::ServerFrame {
                request_id,
                body: Some(body),
            })
        };
        let fail = |status: Status| {
            answer(S::Error(pb::FrameError {
                code: status.code() as u32,
                message: status.message().to_owned(),
                retry_after_ms: 0,
            }))
        };
        let mut db = self.db.lock().unwrap();
        match frame.body? {
            C::Ping(p) => answer(S::Pong(pb::Pong { nonce: p.nonce })),
            C::Send(s) => {
                let conv = match Self::member(&db, &s.conversation_id, &me.0) {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                };
                if s.ciphertext.is_empty() || s.client_msg_id.is_empty() {
                    return fail(Status::invalid_argument("empty send"));
                }
                let dedupe = (me.clone(), s.client_msg_id.clone());
                let result = if let Some(prev) = db.sent.get(&dedupe) {
                    pb::SendResult {
                        duplicate: true,
                        ..prev.clone()
                    }
                } else {
                    let message = pb::Message {
                        conversation_id: s.conversation_id.clone(),
                        message_id: self.ids.next().to_string(),
                        sender: Some(dref(me)),
                        client_msg_id: s.client_msg_id.clone(),
                        ciphertext: s.ciphertext,
                        session_id: s.session_id,
                        sent_at_ms: 1,
                    };
                    self.stored_sends.fetch_add(1, Ordering::SeqCst);
                    db.messages
                        .entry(s.conversation_id.clone())
                        .or_default()
                        .push(message.clone());
                    let targets: Vec<Key> = db
                        .devices
                        .keys()
                        .filter(|k| conv.member_user_ids.contains(&k.0) && *k != me)
                        .cloned()
                        .collect();
                    for t in &targets {
                        Self::push_to(
                            &db,
                            t,
                            pb::ServerFrame {
                                request_id: 0,
                                body: Some(S::Message(message.clone())),
                            },
                        );
                    }
                    let result = pb::SendResult {
                        conversation_id: s.conversation_id,
                        message_id: message.message_id,
                        client_msg_id: s.client_msg_id,
                        sent_at_ms: 1,
                        duplicate: false,
                    };
                    db.sent.insert(dedupe, result.clone());
                    result
                };
                if self.lose_next_send_answer.swap(false, Ordering::SeqCst) {
                    return None;
                }
                answer(S::Sent(result))
            }
            C::SendToDevice(batch) => {
                let dedupe = (me.clone(), batch.client_msg_id.clone());
                let duplicate = !db.to_device_batches.insert(dedupe);
                if !duplicate {
                    for m in batch.messages {
                        let Some(to) = m.recipient.as_ref().map(key) else {
                            return fail(Status::invalid_argument("no recipient"));
                        };
                        if !db.devices.contains_key(&to) {
                            return fail(Status::not_found("no such device"));
                        }
                        self.to_device_messages.fetch_add(1, Ordering::SeqCst);
                        let event = pb::ToDeviceEvent {
                            inbox_id: self.ids.next().to_string(),
                            sender: Some(dref(me)),
                            olm_type: m.olm_type,
                            ciphertext: m.ciphertext,
                            sent_at_ms: 1,
                        };
                        db.inboxes
                            .entry(to.clone())
                            .or_default()
                            .push(event.clone());
                        Self::push_to(
                            &db,
                            &to,
                            pb::ServerFrame {
                                request_id: 0,
                                body: Some(S::ToDevice(event)),
                            },
                        );
                    }
                }
                answer(S::ToDeviceSent(pb::SendToDeviceResult {
                    client_msg_id: batch.client_msg_id,
                    duplicate,
                }))
            }
            C::AckToDevice(ack) => {
                let inbox = db.inboxes.entry(me.clone()).or_default();
                let before = inbox.len();
                inbox.retain(|e| !ack.inbox_ids.contains(&e.inbox_id));
                let removed = (before - inbox.len()) as u32;
                answer(S::Acked(pb::AckToDeviceResult { removed }))
            }
            C::Sync(req) => {
                let limit = if req.limit == 0 {
                    50
                } else {
                    req.limit as usize
                };
                let inbox = db.inboxes.get(me).cloned().unwrap_or_default();
                let to_device_limited = inbox.len() > limit;
                let cursors: HashMap<_, _> = req
                    .cursors
                    .iter()
                    .map(|c| (c.conversation_id.clone(), c.message_id.clone()))
                    .collect();
                let mut conversations = Vec::new();
                for c in db.conversations.values() {
                    if !c.member_user_ids.contains(&me.0) {
                        continue;
                    }
                    let after = cursors.get(&c.conversation_id);
                    let all = db
                        .messages
                        .get(&c.conversation_id)
                        .cloned()
                        .unwrap_or_default();
                    let newer: Vec<_> = all
                        .into_iter()
                        .filter(|m| after.is_none_or(|a| m.message_id > *a))
                        .collect();
                    if newer.is_empty() && after.is_some() {
                        continue;
                    }
                    let limited = newer.len() > limit;
                    conversations.push(pb::ConversationUpdate {
                        conversation: Some(c.clone()),
                        messages: newer.into_iter().take(limit).collect(),
                        limited,
                    });
                }
                answer(S::Sync(pb::SyncResponse {
                    to_device: inbox.into_iter().take(limit).collect(),
                    to_device_limited,
                    conversations,
                }))
            }
        }
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for FakeGateway {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let req = req.into_inner();
        let Some(pb::login_request::Credential::Dev(dev)) = req.credential else {
            return Err(Status::invalid_argument("dev credential only"));
        };
        let token = format!("t{:032x}", rand::random::<u128>());
        let k = (dev.user_id.clone(), req.device_id.clone());
        self.db
            .lock()
            .unwrap()
            .tokens
            .insert(token.clone(), k.clone());
        Ok(Response::new(pb::LoginResponse {
            session_token: token,
            device: Some(dref(&k)),
            expires_at_ms: i64::MAX,
        }))
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::ServerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for FakeGateway {
    type ConnectStream = FrameStream;

    async fn connect(
        &self,
        req: Request<tonic::Streaming<pb::ClientFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let me = self.who(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let conn = {
            let mut db = self.db.lock().unwrap();
            db.next_conn += 1;
            let conn = db.next_conn;
            db.streams
                .entry(me.clone())
                .or_default()
                .push((conn, tx.clone()));
            conn
        };
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = inbound.next().await {
                if let Some(answer) = this.handle(&me, frame)
                    && tx.send(Ok(answer)).await.is_err()
                {
                    break;
                }
            }
            let mut db = this.db.lock().unwrap();
            if let Some(streams) = db.streams.get_mut(&me) {
                streams.retain(|(c, _)| *c != conn);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_keys(
        &self,
        req: Request<pb::UploadKeysRequest>,
    ) -> Result<Response<pb::UploadKeysResponse>, Status> {
        let me = self.who(&req)?;
        let req = req.into_inner();
        let mut db = self.db.lock().unwrap();
        if let Some(keys) = &req.device_keys {
            Machine::verify_device_keys(keys)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if (keys.user_id.clone(), keys.device_id.clone()) != me {
                return Err(Status::permission_denied("keys of another device"));
            }
            match db.devices.get(&me) {
                Some(old) if old != keys => {
                    return Err(Status::invalid_argument("device keys changed"));
                }
                _ => {
                    db.devices.insert(me.clone(), keys.clone());
                }
            }
        } else if !db.devices.contains_key(&me) {
            return Err(Status::failed_precondition("upload device keys first"));
        }
        let otks = db.otks.entry(me.clone()).or_default();
        for k in req.one_time_keys {
            if !otks.iter().any(|o| o.key_id == k.key_id) {
                otks.push(k);
            }
        }
        let count = otks.len() as u32;
        if let Some(f) = req.fallback_key {
            db.fallback.insert(me, f);
        }
        Ok(Response::new(pb::UploadKeysResponse {
            one_time_key_count: count,
        }))
    }

    async fn query_devices(
        &self,
        req: Request<pb::QueryDevicesRequest>,
    ) -> Result<Response<pb::QueryDevicesResponse>, Status> {
        self.who(&req)?;
        let users: BTreeSet<String> = req.into_inner().user_ids.into_iter().collect();
        let db = self.db.lock().unwrap();
        Ok(Response::new(pb::QueryDevicesResponse {
            devices: db
                .devices
                .iter()
                .filter(|(k, _)| users.contains(&k.0))
                .map(|(_, v)| v.clone())
                .collect(),
        }))
    }

    async fn claim_keys(
        &self,
        req: Request<pb::ClaimKeysRequest>,
    ) -> Result<Response<pb::ClaimKeysResponse>, Status> {
        self.who(&req)?;
        let mut db = self.db.lock().unwrap();
        let mut response = pb::ClaimKeysResponse::default();
        for d in req.into_inner().devices {
            let k = key(&d);
            let otk = db.otks.get_mut(&k).and_then(Vec::pop);
            match otk.or_else(|| db.fallback.get(&k).cloned()) {
                Some(key) => response.keys.push(pb::ClaimedKey {
                    user_id: d.user_id,
                    device_id: d.device_id,
                    key: Some(key),
                }),
                None => response.unavailable.push(d),
            }
        }
        Ok(Response::new(response))
    }

    async fn create_conversation(
        &self,
        req: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::CreateConversationResponse>, Status> {
        let me = self.who(&req)?;
        let req = req.into_inner();
        let mut members = vec![me.0.clone()];
        for m in req.member_user_ids {
            if !members.contains(&m) {
                members.push(m);
            }
        }
        let conversation = pb::Conversation {
            conversation_id: ConversationId::random().to_string(),
            kind: req.kind,
            member_user_ids: members,
            created_at_ms: 1,
            head_message_id: String::new(),
            membership_seq: 1,
        };
        self.db
            .lock()
            .unwrap()
            .conversations
            .insert(conversation.conversation_id.clone(), conversation.clone());
        Ok(Response::new(pb::CreateConversationResponse {
            conversation: Some(conversation),
        }))
    }

    async fn list_conversations(
        &self,
        req: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let me = self.who(&req)?;
        let db = self.db.lock().unwrap();
        Ok(Response::new(pb::ListConversationsResponse {
            conversations: db
                .conversations
                .values()
                .filter(|c| c.member_user_ids.contains(&me.0))
                .cloned()
                .collect(),
        }))
    }

    async fn get_conversation(
        &self,
        req: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let me = self.who(&req)?;
        let db = self.db.lock().unwrap();
        let c = Self::member(&db, &req.get_ref().conversation_id, &me.0)?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(c),
            membership_log: Vec::new(),
        }))
    }

    async fn update_membership(
        &self,
        req: Request<pb::UpdateMembershipRequest>,
    ) -> Result<Response<pb::UpdateMembershipResponse>, Status> {
        let me = self.who(&req)?;
        let req = req.into_inner();
        let mut db = self.db.lock().unwrap();
        Self::member(&db, &req.conversation_id, &me.0)?;
        let c = db
            .conversations
            .get_mut(&req.conversation_id)
            .ok_or_else(|| Status::not_found("no such conversation"))?;
        match pb::MembershipOp::try_from(req.op) {
            Ok(pb::MembershipOp::Add) => {
                if !c.member_user_ids.contains(&req.target_user_id) {
                    c.member_user_ids.push(req.target_user_id);
                }
            }
            Ok(pb::MembershipOp::Remove) => c.member_user_ids.retain(|m| *m != req.target_user_id),
            Ok(pb::MembershipOp::Leave) => c.member_user_ids.retain(|m| *m != me.0),
            _ => return Err(Status::invalid_argument("op")),
        }
        c.membership_seq += 1;
        Ok(Response::new(pb::UpdateMembershipResponse {
            event: None,
            conversation: Some(c.clone()),
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let me = self.who(&req)?;
        let req = req.into_inner();
        let db = self.db.lock().unwrap();
        Self::member(&db, &req.conversation_id, &me.0)?;
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let mut all = db
            .messages
            .get(&req.conversation_id)
            .cloned()
            .unwrap_or_default();
        all.reverse();
        let page: Vec<_> = all
            .into_iter()
            .filter(|m| req.from_message_id.is_empty() || m.message_id < req.from_message_id)
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        let page: Vec<_> = page.into_iter().take(limit).collect();
        let next_from = if more {
            page.last()
                .map(|m| m.message_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::HistoryResponse {
            messages: page,
            next_from,
        }))
    }
}
