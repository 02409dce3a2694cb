//! What members must hear besides messages: a conversation they are in was
//! created or changed members, or a user they share a conversation with
//! changed devices. Clients refresh member and device lists on these, so a
//! member who left gets no new room key and a new device gets one at the
//! next send. Notifications are at most once, like deliveries; the lists
//! they point at are always in the store.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use chappe_bus::{Bus, Headers, Subjects, Subscription};
use chappe_proto::ids::UserId;
use chappe_proto::internal::{KeysChanged, UserDelivery, user_delivery};
use chappe_proto::v1;
use futures::StreamExt;
use prost::Message as _;
use tokio::task::JoinHandle;

use crate::FanoutStore;

/// Publishes `item` to the deliver subject of each of `users`.
pub async fn publish_to(
    bus: &dyn Bus,
    subjects: &Subjects,
    users: impl IntoIterator<Item = String>,
    item: user_delivery::Item,
) {
    let payload = Bytes::from(UserDelivery { item: Some(item) }.encode_to_vec());
    for user in users {
        let Ok(user) = UserId::parse(user) else {
            continue;
        };
        if let Err(e) = bus
            .publish(
                &subjects.deliver_user(&user),
                Headers::new(),
                payload.clone(),
            )
            .await
        {
            tracing::warn!(error = %e, %user, "notification not published");
        }
    }
}

/// Tells every member (and `also`, a user who just left) about the
/// conversation as it is now.
pub async fn conversation_changed(
    bus: &dyn Bus,
    subjects: &Subjects,
    conversation: &v1::Conversation,
    also: Option<&UserId>,
) {
    let mut users: BTreeSet<String> = conversation.member_user_ids.iter().cloned().collect();
    users.extend(also.map(ToString::to_string));
    let item = user_delivery::Item::ConversationChanged(conversation.clone());
    publish_to(bus, subjects, users, item).await;
}

/// Relays keydir's device-list events to everyone who shares a
/// conversation with the user (the user included: their other devices).
pub struct KeyEvents {
    task: JoinHandle<()>,
}

impl KeyEvents {
    pub async fn start(
        store: Arc<dyn FanoutStore>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Result<Self, chappe_bus::Error> {
        let events = bus.subscribe(&subjects.evt_keys_all()).await?;
        let task = tokio::spawn(relay(events, store, bus, subjects));
        Ok(Self { task })
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn relay(
    mut events: Subscription,
    store: Arc<dyn FanoutStore>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
) {
    while let Some(event) = events.next().await {
        let Ok(KeysChanged { user_id, .. }) = KeysChanged::decode(event.payload) else {
            tracing::warn!(subject = %event.subject, "malformed key event ignored");
            continue;
        };
        let mut users = BTreeSet::from([user_id.clone()]);
        match store.conversations_of(&user_id).await {
            Ok(conversations) => {
                for c in conversations {
                    match store.members(c.conversation_id).await {
                        Ok(members) => users.extend(members),
                        Err(e) => tracing::warn!(error = %e, "members not read for a key event"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "conversations not read for a key event"),
        }
        let item = user_delivery::Item::DeviceListChanged(v1::DeviceListChanged { user_id });
        publish_to(&*bus, &subjects, users, item).await;
    }
}
