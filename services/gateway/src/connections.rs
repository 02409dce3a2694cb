//! The devices connected to this gateway.
//!
//! While at least one device of a user is connected here, the gateway holds
//! one bus subscription on `chappe.deliver.u.<user>` and routes what arrives:
//! a conversation message to every connected device of the user but the one
//! that sent it, a to-device message to its one device, membership and
//! device-list changes to every device of the user. A device whose
//! outbound queue is full is disconnected: it reconnects and syncs, which
//! beats unbounded memory here.
//!
//! Telemetry: `chappe_gateway_connected_devices` follows the devices held
//! here; each delivery is pushed in a `gateway.push` span, child of the
//! trace context its bus message carries, and each frame pushed counts in
//! `chappe_gateway_pushed_frames_total{kind}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use chappe_bus::{Bus, Subjects};
use chappe_proto::ids::{DeviceId, UserId};
use chappe_proto::internal::{UserDelivery, user_delivery};
use chappe_proto::v1::{Goaway, ServerFrame, server_frame};
use chappe_telemetry::metrics::{self, KindLabels};
use chappe_telemetry::otel;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::auth::Identity;

/// Where frames for one connected device go.
pub type Outbound = mpsc::Sender<Result<ServerFrame, Status>>;

#[derive(Clone)]
struct Conn {
    device: DeviceId,
    tx: Outbound,
    cancel: CancellationToken,
}

struct UserConns {
    conns: HashMap<u64, Conn>,
    router: JoinHandle<()>,
}

/// Every device connected to this gateway, by user.
pub struct Connections {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    next_id: AtomicU64,
    users: Mutex<HashMap<UserId, UserConns>>,
    /// Set once the gateway shuts down: new streams are refused.
    draining: AtomicBool,
}

/// A connected device; dropping it disconnects the device from routing.
pub struct Registration {
    id: u64,
    user: UserId,
    connections: Weak<Connections>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(c) = self.connections.upgrade() {
            c.unregister(&self.user, self.id);
        }
    }
}

impl Connections {
    pub fn new(bus: Arc<dyn Bus>, subjects: Subjects) -> Self {
        Self {
            bus,
            subjects,
            next_id: AtomicU64::new(1),
            users: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
        }
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, UserConns>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Devices connected here now.
    pub fn device_count(&self) -> usize {
        self.users().values().map(|u| u.conns.len()).sum()
    }

    /// Starts routing deliveries of `identity`'s user to `tx`. Returns once
    /// the bus subscription is in place, so nothing published after this
    /// returns is missed.
    pub async fn register(
        self: &Arc<Self>,
        identity: &Identity,
        tx: Outbound,
        cancel: CancellationToken,
    ) -> Result<Registration, Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "this gateway is shutting down; reconnect to another",
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            device: identity.device.clone(),
            tx,
            cancel,
        };
        let registration = Registration {
            id,
            user: identity.user.clone(),
            connections: Arc::downgrade(self),
        };
        if let Some(user) = self.users().get_mut(&identity.user) {
            replace_device(&mut user.conns, &conn.device);
            user.conns.insert(id, conn);
            devices_gauge().inc();
            return Ok(registration);
        }
        let subscription = self
            .bus
            .subscribe(&self.subjects.deliver_user(&identity.user))
            .await
            .map_err(|e| Status::unavailable(format!("cannot subscribe deliveries: {e}")))?;
        let mut users = self.users();
        match users.get_mut(&identity.user) {
            // Another device of the user registered meanwhile: use its
            // subscription, drop ours.
            Some(user) => {
                replace_device(&mut user.conns, &conn.device);
                user.conns.insert(id, conn);
            }
            None => {
                let router = tokio::spawn(route(
                    Arc::downgrade(self),
                    identity.user.clone(),
                    subscription,
                ));
                users.insert(
                    identity.user.clone(),
                    UserConns {
                        conns: HashMap::from([(id, conn)]),
                        router,
                    },
                );
            }
        }
        devices_gauge().inc();
        Ok(registration)
    }

    fn unregister(&self, user: &UserId, id: u64) {
        let mut users = self.users();
        if let Some(entry) = users.get_mut(user) {
            if entry.conns.remove(&id).is_some() {
                devices_gauge().dec();
            }
            if entry.conns.is_empty() {
                entry.router.abort();
                users.remove(user);
            }
        }
    }

    /// Tells every connected device to reconnect elsewhere, then closes it.
    pub async fn goaway_all(&self, reason: &str) {
        self.draining.store(true, Ordering::Release);
        let conns: Vec<Conn> = self
            .users()
            .values()
            .flat_map(|u| u.conns.values().cloned())
            .collect();
        for conn in conns {
            let frame = ServerFrame {
                request_id: 0,
                body: Some(server_frame::Body::Goaway(Goaway {
                    reason: reason.to_owned(),
                })),
            };
            let _ = conn.tx.try_send(Ok(frame));
            conn.cancel.cancel();
        }
    }

    fn deliver(&self, user: &UserId, delivery: UserDelivery) {
        let conns: Vec<Conn> = match self.users().get(user) {
            Some(u) => u.conns.values().cloned().collect(),
            None => return,
        };
        let (body, only, except) = match delivery.item {
            Some(user_delivery::Item::Message(m)) => {
                // The sending device has its answer already.
                let except = m
                    .sender
                    .as_ref()
                    .filter(|s| s.user_id == user.as_str())
                    .map(|s| s.device_id.clone());
                (server_frame::Body::Message(m), None, except)
            }
            Some(user_delivery::Item::ToDevice(d)) => match d.event {
                Some(event) => (server_frame::Body::ToDevice(event), Some(d.device_id), None),
                None => return,
            },
            Some(user_delivery::Item::ConversationChanged(c)) => {
                (server_frame::Body::ConversationChanged(c), None, None)
            }
            Some(user_delivery::Item::DeviceListChanged(d)) => {
                (server_frame::Body::DeviceListChanged(d), None, None)
            }
            Some(user_delivery::Item::PresenceChanged(p)) => {
                (server_frame::Body::PresenceChanged(p), None, None)
            }
            Some(user_delivery::Item::Typing(t)) => (server_frame::Body::Typing(t), None, None),
            None => return,
        };
        let kind = KindLabels {
            kind: match &body {
                server_frame::Body::Message(_) => "message",
                server_frame::Body::ToDevice(_) => "to_device",
                server_frame::Body::ConversationChanged(_) => "conversation_changed",
                server_frame::Body::DeviceListChanged(_) => "device_list_changed",
                server_frame::Body::PresenceChanged(_) => "presence_changed",
                server_frame::Body::Typing(_) => "typing",
                _ => "other",
            },
        };
        // Storage time of a message, for the delivery lag of each push.
        let stored_at_ms = match &body {
            server_frame::Body::Message(m) => Some(m.sent_at_ms),
            _ => None,
        };
        for conn in conns {
            let device = conn.device.as_str();
            if only.as_deref().is_some_and(|d| d != device)
                || except.as_deref().is_some_and(|d| d == device)
            {
                continue;
            }
            let frame = ServerFrame {
                request_id: 0,
                body: Some(body.clone()),
            };
            match conn.tx.try_send(Ok(frame)) {
                Ok(()) => {
                    let m = metrics::metrics();
                    m.gateway_pushed_frames.get_or_create(&kind).inc();
                    if let Some(at) = stored_at_ms {
                        let lag_ms = chappe_proto::ids::unix_ms().saturating_sub(at).max(0);
                        m.gateway_delivery_lag.observe(lag_ms as f64 / 1000.0);
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(%user, %device, "device too slow: disconnected, it will resync");
                    conn.cancel.cancel();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

fn devices_gauge() -> &'static metrics::Gauge {
    &metrics::metrics().gateway_connected_devices
}

/// One stream per device: a device that connects again (a reconnect, or a
/// second stream on one HTTP/2 connection) replaces its older stream, which
/// is told to go. Keeps a device from multiplying its queues and copies.
fn replace_device(conns: &mut HashMap<u64, Conn>, device: &DeviceId) {
    conns.retain(|_, old| {
        if &old.device != device {
            return true;
        }
        devices_gauge().dec();
        let frame = ServerFrame {
            request_id: 0,
            body: Some(server_frame::Body::Goaway(Goaway {
                reason: "replaced by a newer connection of this device".into(),
            })),
        };
        let _ = old.tx.try_send(Ok(frame));
        old.cancel.cancel();
        false
    });
}

async fn route(
    connections: Weak<Connections>,
    user: UserId,
    mut subscription: chappe_bus::Subscription,
) {
    while let Some(message) = subscription.next().await {
        let Some(connections) = connections.upgrade() else {
            return;
        };
        let span = tracing::info_span!(
            "gateway.push",
            otel.kind = "consumer",
            %user,
        );
        otel::set_parent(&span, &message.headers);
        span.in_scope(|| match UserDelivery::decode(message.payload) {
            Ok(delivery) => connections.deliver(&user, delivery),
            Err(e) => tracing::warn!(%user, error = %e, "malformed delivery ignored"),
        });
    }
    // The subscription ended (the bus closed): these devices would get no
    // more deliveries here. Close them; they reconnect and resubscribe.
    let Some(connections) = connections.upgrade() else {
        return;
    };
    let entry = connections.users().remove(&user);
    if let Some(entry) = entry {
        devices_gauge().dec_by(entry.conns.len() as i64);
        tracing::warn!(%user, "delivery subscription ended; disconnecting the user's devices");
        for conn in entry.conns.values() {
            conn.cancel.cancel();
        }
    }
}
