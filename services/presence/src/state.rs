//! The presence of one user, as pure state: no I/O, no clock. Every
//! function takes the time (`now_ms`, milliseconds since the Unix epoch)
//! from its caller, so the same record gives the same answers in tests, in
//! one process and in a cluster.
//!
//! A user's record lists the devices the gateways reported connected, each
//! with its last heartbeat and its last activity. A device counts as
//! connected while its last heartbeat is at most `ttl` old: a gateway that
//! dies without a word stops sending heartbeats, and its users' devices fall
//! out by themselves. Times only move forward: an event older than what the
//! record holds (a late message, another instance's clock slightly behind)
//! never moves a time back.

use std::collections::BTreeMap;
use std::time::Duration;

use chappe_proto::ids::DeviceId;
use serde::{Deserialize, Serialize};

use crate::config::PresenceConfig;

/// What the presence service knows of one connected device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSeen {
    /// The last connection event or heartbeat of the device.
    pub last_heartbeat_ms: u64,
    /// The last time the device was in use (connection, or a heartbeat that
    /// reported activity); 0 if never reported.
    pub last_active_ms: u64,
    /// The Connect stream this was last reported for (random per stream,
    /// 0 if unknown): a disconnection of another stream is an older one's.
    #[serde(default)]
    pub connection_id: u64,
}

/// The presence record of one user, as kept in a [`PresenceStore`](crate::store::PresenceStore).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPresence {
    /// The user's connected devices, by device id.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceSeen>,
    /// The last time one of the user's devices was seen connected, if ever.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// The state the user's contacts were last told of, if any: a change
    /// is pushed once, by whichever presence instance stores it first.
    #[serde(default)]
    pub announced: Option<PresenceState>,
}

/// The state a user is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceState {
    /// A device is connected and was active within `away_after`.
    Online,
    /// A device is connected, but none was active within `away_after`.
    Away,
    /// No device is connected.
    Offline,
}

/// A user's presence as others may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub state: PresenceState,
    /// The last time the user was seen connected; `None` if never, or if the
    /// user hides it.
    pub last_seen_ms: Option<u64>,
}

impl Presence {
    /// The presence of a user with no record: offline, never seen.
    pub const UNKNOWN: Presence = Presence {
        state: PresenceState::Offline,
        last_seen_ms: None,
    };

    /// This presence as shown by a user who hides their last-seen time.
    pub fn hiding_last_seen(self, hide: bool) -> Presence {
        Presence {
            last_seen_ms: if hide { None } else { self.last_seen_ms },
            ..self
        }
    }
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether `then` is at most `window` before `now` (a time after `now`, from
/// a clock slightly ahead, counts as within).
fn within(now_ms: u64, then_ms: u64, window: Duration) -> bool {
    now_ms.saturating_sub(then_ms) <= millis(window)
}

impl UserPresence {
    fn saw(&mut self, now_ms: u64) {
        self.last_seen_ms = Some(self.last_seen_ms.map_or(now_ms, |t| t.max(now_ms)));
    }

    /// A gateway reports that `device` connected on stream `connection_id`:
    /// it is connected and active.
    pub fn connect(&mut self, device: &DeviceId, connection_id: u64, now_ms: u64) {
        let seen = self
            .devices
            .entry(device.as_str().to_owned())
            .or_insert(DeviceSeen {
                last_heartbeat_ms: now_ms,
                last_active_ms: now_ms,
                connection_id,
            });
        seen.connection_id = connection_id;
        seen.last_heartbeat_ms = seen.last_heartbeat_ms.max(now_ms);
        seen.last_active_ms = seen.last_active_ms.max(now_ms);
        self.saw(now_ms);
    }

    /// A gateway reports that `device` is still connected, and whether it
    /// was in use since its previous heartbeat.
    ///
    /// A heartbeat of a device the record does not hold (its record expired
    /// during a partition, or the presence store was restarted) adds it: the
    /// gateway knows better. Such a device counts as active only if the
    /// heartbeat says so.
    pub fn heartbeat(&mut self, device: &DeviceId, connection_id: u64, active: bool, now_ms: u64) {
        let seen = self
            .devices
            .entry(device.as_str().to_owned())
            .or_insert(DeviceSeen {
                last_heartbeat_ms: now_ms,
                last_active_ms: 0,
                connection_id,
            });
        seen.last_heartbeat_ms = seen.last_heartbeat_ms.max(now_ms);
        if active {
            seen.last_active_ms = seen.last_active_ms.max(now_ms);
        }
        self.saw(now_ms);
    }

    /// A gateway reports that `device`'s stream `connection_id` ended: it
    /// was connected until `now_ms`. The device stays connected if the
    /// record holds a newer stream of it (it moved to another gateway, which
    /// reported it before this gateway reported the end of the old one).
    pub fn disconnect(&mut self, device: &DeviceId, connection_id: u64, now_ms: u64) {
        let newer = self.devices.get(device.as_str()).is_some_and(|seen| {
            connection_id != 0 && seen.connection_id != 0 && seen.connection_id != connection_id
        });
        if !newer {
            self.devices.remove(device.as_str());
        }
        self.saw(now_ms);
    }

    /// Drops the devices whose last heartbeat is more than `ttl` before
    /// `now_ms`; the user was last seen at the latest of their heartbeats.
    /// Returns how many devices were dropped.
    pub fn expire(&mut self, now_ms: u64, ttl: Duration) -> usize {
        let before = self.devices.len();
        let mut latest = None::<u64>;
        self.devices.retain(|_, seen| {
            let keep = within(now_ms, seen.last_heartbeat_ms, ttl);
            if !keep {
                latest =
                    Some(latest.map_or(seen.last_heartbeat_ms, |t| t.max(seen.last_heartbeat_ms)));
            }
            keep
        });
        if let Some(latest) = latest {
            self.saw(latest);
        }
        before - self.devices.len()
    }

    /// Whether a device counts as connected at `now_ms`.
    pub fn is_connected(&self, now_ms: u64, ttl: Duration) -> bool {
        self.devices
            .values()
            .any(|seen| within(now_ms, seen.last_heartbeat_ms, ttl))
    }

    /// The user's presence at `now_ms`, as others may see it: online if a
    /// device heartbeated within `ttl` and was active within `away_after`,
    /// away if a device heartbeated within `ttl` but none of those was
    /// active, offline otherwise. Devices past the ttl count as gone whether
    /// or not [`expire`](Self::expire) was called.
    pub fn status(&self, now_ms: u64, config: &PresenceConfig) -> Presence {
        let mut state = PresenceState::Offline;
        for seen in self.devices.values() {
            if !within(now_ms, seen.last_heartbeat_ms, config.ttl) {
                continue;
            }
            if seen.last_active_ms != 0 && within(now_ms, seen.last_active_ms, config.away_after) {
                state = PresenceState::Online;
                break;
            }
            state = PresenceState::Away;
        }
        Presence {
            state,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000;
    const T0: u64 = 1_700_000_000_000;

    fn device(id: &str) -> DeviceId {
        DeviceId::parse(id).unwrap()
    }

    fn config() -> PresenceConfig {
        PresenceConfig::default()
    }

    fn status(record: &UserPresence, now: u64) -> Presence {
        record.status(now, &config())
    }

    #[test]
    fn no_record_and_an_empty_record_are_offline() {
        let record = UserPresence::default();
        assert_eq!(status(&record, T0), Presence::UNKNOWN);
    }

    #[test]
    fn connecting_makes_a_user_online() {
        let mut record = UserPresence::default();
        record.connect(&device("phone"), 1, T0);
        assert_eq!(
            status(&record, T0),
            Presence {
                state: PresenceState::Online,
                last_seen_ms: Some(T0)
            }
        );
    }

    #[test]
    fn heartbeats_keep_a_user_online_past_the_ttl() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.connect(&phone, 1, T0);
        for n in 1..=10 {
            record.heartbeat(&phone, 1, true, T0 + n * 20 * S);
        }
        let now = T0 + 200 * S + 59 * S;
        assert_eq!(status(&record, now).state, PresenceState::Online);
        assert_eq!(record.expire(now, config().ttl), 0);
        assert_eq!(status(&record, now).last_seen_ms, Some(T0 + 200 * S));
    }

    #[test]
    fn inactive_heartbeats_make_a_user_away_after_away_after() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.connect(&phone, 1, T0);
        let mut now = T0;
        while now < T0 + 300 * S {
            now += 20 * S;
            record.heartbeat(&phone, 1, false, now);
            assert_eq!(status(&record, now).state, PresenceState::Online, "{now}");
        }
        now += 20 * S;
        record.heartbeat(&phone, 1, false, now);
        assert_eq!(status(&record, now).state, PresenceState::Away);
        // Activity brings the user back.
        now += 20 * S;
        record.heartbeat(&phone, 1, true, now);
        assert_eq!(status(&record, now).state, PresenceState::Online);
    }

    #[test]
    fn one_active_device_is_enough_to_be_online() {
        let mut record = UserPresence::default();
        let (phone, laptop) = (device("phone"), device("laptop"));
        record.connect(&phone, 1, T0);
        record.connect(&laptop, 1, T0);
        let now = T0 + 400 * S;
        record.heartbeat(&phone, 1, false, now);
        assert_eq!(status(&record, now).state, PresenceState::Away);
        record.heartbeat(&laptop, 1, true, now);
        assert_eq!(status(&record, now).state, PresenceState::Online);
    }

    #[test]
    fn disconnecting_the_last_device_makes_a_user_offline() {
        let mut record = UserPresence::default();
        let (phone, laptop) = (device("phone"), device("laptop"));
        record.connect(&phone, 1, T0);
        record.connect(&laptop, 1, T0 + S);
        record.disconnect(&phone, 1, T0 + 10 * S);
        assert_eq!(status(&record, T0 + 10 * S).state, PresenceState::Online);
        record.disconnect(&laptop, 1, T0 + 12 * S);
        assert_eq!(
            status(&record, T0 + 12 * S),
            Presence {
                state: PresenceState::Offline,
                last_seen_ms: Some(T0 + 12 * S)
            }
        );
        assert!(record.devices.is_empty());
    }

    #[test]
    fn gateway_died_no_disconnect_offline_after_ttl() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.connect(&phone, 1, T0);
        record.heartbeat(&phone, 1, true, T0 + 20 * S);
        // The gateway dies: no heartbeat, no disconnect.
        let last = T0 + 20 * S;
        assert_eq!(status(&record, last + 60 * S).state, PresenceState::Online);
        // Past the ttl the user is offline, even before expire runs...
        let after = last + 60 * S + 1;
        assert_eq!(
            status(&record, after),
            Presence {
                state: PresenceState::Offline,
                last_seen_ms: Some(last)
            }
        );
        // ...and expire drops the device, last seen at its last heartbeat.
        assert_eq!(record.expire(after, config().ttl), 1);
        assert!(record.devices.is_empty());
        assert_eq!(record.last_seen_ms, Some(last));
        assert_eq!(status(&record, after).state, PresenceState::Offline);
    }

    #[test]
    fn expire_drops_only_stale_devices() {
        let mut record = UserPresence::default();
        let (phone, laptop) = (device("phone"), device("laptop"));
        record.connect(&phone, 1, T0);
        record.connect(&laptop, 1, T0);
        record.heartbeat(&laptop, 1, true, T0 + 50 * S);
        assert_eq!(record.expire(T0 + 61 * S, config().ttl), 1);
        assert_eq!(record.devices.keys().collect::<Vec<_>>(), ["laptop"]);
        assert_eq!(record.last_seen_ms, Some(T0 + 50 * S));
        assert_eq!(status(&record, T0 + 61 * S).state, PresenceState::Online);
    }

    #[test]
    fn a_heartbeat_of_an_unknown_device_reconnects_it() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.heartbeat(&phone, 1, false, T0);
        assert_eq!(status(&record, T0).state, PresenceState::Away);
        let mut record = UserPresence::default();
        record.heartbeat(&phone, 1, true, T0);
        assert_eq!(status(&record, T0).state, PresenceState::Online);
    }

    #[test]
    fn reconnecting_after_expiry_is_online_again() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.connect(&phone, 1, T0);
        record.expire(T0 + 61 * S, config().ttl);
        assert_eq!(status(&record, T0 + 61 * S).state, PresenceState::Offline);
        record.connect(&phone, 1, T0 + 70 * S);
        assert_eq!(
            status(&record, T0 + 70 * S),
            Presence {
                state: PresenceState::Online,
                last_seen_ms: Some(T0 + 70 * S)
            }
        );
    }

    #[test]
    fn hidden_last_seen_is_not_shown() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.connect(&phone, 1, T0);
        record.disconnect(&phone, 1, T0 + S);
        assert_eq!(
            status(&record, T0 + 2 * S).hiding_last_seen(true),
            Presence {
                state: PresenceState::Offline,
                last_seen_ms: None
            }
        );
        // The time is still kept, for when the user shows it again.
        assert_eq!(record.last_seen_ms, Some(T0 + S));
        assert_eq!(
            status(&record, T0 + 2 * S)
                .hiding_last_seen(false)
                .last_seen_ms,
            Some(T0 + S)
        );
    }

    #[test]
    fn late_events_never_move_times_back() {
        let mut record = UserPresence::default();
        let phone = device("phone");
        record.connect(&phone, 1, T0 + 10 * S);
        record.heartbeat(&phone, 1, true, T0);
        assert_eq!(
            record.devices["phone"],
            DeviceSeen {
                last_heartbeat_ms: T0 + 10 * S,
                last_active_ms: T0 + 10 * S,
                connection_id: 1,
            }
        );
        record.disconnect(&phone, 1, T0 + 5 * S);
        assert_eq!(record.last_seen_ms, Some(T0 + 10 * S));
        // A clock slightly ahead counts as now.
        let mut record = UserPresence::default();
        record.connect(&phone, 1, T0 + S);
        assert_eq!(status(&record, T0).state, PresenceState::Online);
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let mut record = UserPresence::default();
        record.connect(&device("phone"), 1, T0);
        record.announced = Some(PresenceState::Online);
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            serde_json::from_slice::<UserPresence>(&json).unwrap(),
            record
        );
        // Fields added later default when absent.
        assert_eq!(
            serde_json::from_slice::<UserPresence>(b"{}").unwrap(),
            UserPresence::default()
        );
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn a_late_disconnect_of_an_older_stream_keeps_the_newer_one() {
        let config = PresenceConfig::default();
        let phone = DeviceId::parse("phone").unwrap();
        let mut record = UserPresence::default();
        record.connect(&phone, 1, T0);
        // The phone moved to another gateway, which reported it first.
        record.connect(&phone, 2, T0 + 1_000);
        record.disconnect(&phone, 1, T0 + 1_100);
        assert_eq!(
            record.status(T0 + 1_200, &config).state,
            PresenceState::Online
        );
        // The end of the current stream does disconnect it.
        record.disconnect(&phone, 2, T0 + 1_300);
        assert_eq!(
            record.status(T0 + 1_400, &config).state,
            PresenceState::Offline
        );
    }
}
