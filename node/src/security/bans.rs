//! Bans by client id, user name or address, with expiry, and flapping detection that bans
//! a client id reconnecting too often.
//!
//! Both tables are bounded: bans expire, and flapping entries older than their window are
//! swept.

use std::net::IpAddr;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ipnet::IpNet;
use raftmq_cluster::message::now_ms;

use crate::config::{BanConfig, FlappingConfig};
use crate::security::SecurityError;

/// What a ban applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BanTarget {
    /// A client identifier.
    Client(String),
    /// A user name.
    User(String),
}

/// The ban list.
#[derive(Debug, Default)]
pub struct Bans {
    /// Target -> end (Unix seconds), `None` for never.
    exact: DashMap<BanTarget, Option<u64>>,
    /// std `RwLock`: networks change rarely and are checked once per accepted connection.
    nets: RwLock<Vec<(IpNet, Option<u64>)>>,
}

impl Bans {
    /// Bans from configuration (`client:ID`, `user:NAME`, `ip:ADDRESS[/PREFIX]`).
    pub fn from_config(entries: &[BanConfig]) -> Result<Bans, SecurityError> {
        let bans = Bans::default();
        for entry in entries {
            let invalid = || SecurityError::Invalid(format!("invalid ban subject {:?}", entry.who));
            match entry.who.split_once(':') {
                Some(("client", id)) if !id.is_empty() => bans.ban(BanTarget::Client(id.to_owned()), entry.until),
                Some(("user", name)) if !name.is_empty() => bans.ban(BanTarget::User(name.to_owned()), entry.until),
                Some(("ip", addr)) => {
                    let net = addr.parse::<IpNet>().ok().or_else(|| addr.parse::<IpAddr>().ok().map(IpNet::from)).ok_or_else(invalid)?;
                    if let Ok(mut nets) = bans.nets.write() {
                        nets.push((net, entry.until));
                    }
                }
                _ => return Err(invalid()),
            }
        }
        Ok(bans)
    }

    /// Adds or extends a ban.
    pub fn ban(&self, target: BanTarget, until: Option<u64>) {
        self.exact.insert(target, until);
    }

    fn active(until: Option<u64>) -> bool {
        until.is_none_or(|t| now_ms() / 1000 < t)
    }

    /// Parses `client:ID`, `user:NAME` or `ip:ADDRESS[/PREFIX]` and bans it until `until`.
    pub fn ban_subject(&self, who: &str, until: Option<u64>) -> Result<(), SecurityError> {
        let parsed = Bans::from_config(&[BanConfig { who: who.to_owned(), until }])?;
        for entry in parsed.exact.iter() {
            self.ban(entry.key().clone(), *entry.value());
        }
        if let (Ok(new), Ok(mut nets)) = (parsed.nets.read(), self.nets.write()) {
            for (net, until) in new.iter() {
                nets.retain(|(n, _)| n != net);
                nets.push((*net, *until));
            }
        }
        Ok(())
    }

    /// Lifts a ban given as `client:ID`, `user:NAME` or `ip:ADDRESS[/PREFIX]`.
    pub fn unban(&self, who: &str) -> bool {
        match who.split_once(':') {
            Some(("client", id)) => self.exact.remove(&BanTarget::Client(id.to_owned())).is_some(),
            Some(("user", name)) => self.exact.remove(&BanTarget::User(name.to_owned())).is_some(),
            Some(("ip", addr)) => {
                let Some(net) = addr.parse::<IpNet>().ok().or_else(|| addr.parse::<IpAddr>().ok().map(IpNet::from)) else { return false };
                let Ok(mut nets) = self.nets.write() else { return false };
                let before = nets.len();
                nets.retain(|(n, _)| *n != net);
                nets.len() != before
            }
            _ => false,
        }
    }

    /// Every active ban as (`kind:value`, until).
    pub fn list(&self) -> Vec<(String, Option<u64>)> {
        let mut out: Vec<(String, Option<u64>)> = self
            .exact
            .iter()
            .filter(|e| Self::active(*e.value()))
            .map(|e| {
                let who = match e.key() {
                    BanTarget::Client(id) => format!("client:{id}"),
                    BanTarget::User(name) => format!("user:{name}"),
                };
                (who, *e.value())
            })
            .collect();
        if let Ok(nets) = self.nets.read() {
            out.extend(nets.iter().filter(|(_, u)| Self::active(*u)).map(|(n, u)| (format!("ip:{n}"), *u)));
        }
        out.sort();
        out
    }

    /// Whether `target` is banned now (expired bans are removed on the way).
    pub fn is_banned(&self, target: &BanTarget) -> bool {
        let until = match self.exact.get(target) {
            Some(u) => *u,
            None => return false,
        };
        if Self::active(until) {
            return true;
        }
        self.exact.remove_if(target, |_, u| !Self::active(*u));
        false
    }

    /// Whether the address is in a banned network.
    pub fn is_ip_banned(&self, ip: IpAddr) -> bool {
        self.nets.read().map(|nets| nets.iter().any(|(net, until)| net.contains(&ip) && Self::active(*until))).unwrap_or(false)
    }
}

/// Most keys a [`WindowCounter`] tracks: beyond it new keys are not counted (the limits
/// they feed fail open; the verification pool still bounds the cost of each attempt).
const MAX_TRACKED: usize = 100_000;

/// Events per key within a fixed window that starts at the key's first event.
#[derive(Debug)]
pub struct WindowCounter<K: std::hash::Hash + Eq> {
    window: Duration,
    seen: DashMap<K, (Instant, u32)>,
}

impl<K: std::hash::Hash + Eq + Clone> WindowCounter<K> {
    /// A counter with windows of `window`.
    pub fn new(window: Duration) -> WindowCounter<K> {
        WindowCounter { window, seen: DashMap::new() }
    }

    /// Counts an event for `key`; returns the count within its window (0 when untracked).
    pub fn record(&self, key: &K) -> u32 {
        let now = Instant::now();
        if !self.seen.contains_key(key) && self.seen.len() >= MAX_TRACKED {
            self.sweep();
            if self.seen.len() >= MAX_TRACKED {
                return 0;
            }
        }
        let mut entry = self.seen.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(entry.0) > self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1
    }

    /// Events for `key` within its current window.
    pub fn count(&self, key: &K) -> u32 {
        match self.seen.get(key) {
            Some(e) if Instant::now().duration_since(e.0) <= self.window => e.1,
            _ => 0,
        }
    }

    /// Forgets keys whose window has passed (called periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.seen.retain(|_, (start, _)| now.duration_since(*start) <= self.window);
    }
}

/// Counts authenticated connects per client id within a window. Only connects that passed
/// authentication count: otherwise anyone could get someone else's client id banned.
#[derive(Debug)]
pub struct Flapping {
    config: FlappingConfig,
    seen: WindowCounter<String>,
}

impl Flapping {
    /// A detector with `config`.
    pub fn new(config: FlappingConfig) -> Flapping {
        let seen = WindowCounter::new(Duration::from_secs(config.window_secs));
        Flapping { config, seen }
    }

    /// Records an authenticated connect; returns true when the client id crossed the limit
    /// and should be banned for `ban_secs`.
    pub fn record(&self, client_id: &str) -> bool {
        if !self.config.enabled {
            return false;
        }
        self.seen.record(&client_id.to_owned()) > self.config.max_count
    }

    /// Forgets entries whose window has passed (called periodically).
    pub fn sweep(&self) {
        self.seen.sweep();
    }

    /// Ban length.
    pub fn ban_secs(&self) -> u64 {
        self.config.ban_secs
    }

    /// Window length (the sweep period).
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_secs.max(1))
    }
}

/// Failed logins per address and per user name: password guessing is refused before it
/// costs a password check.
#[derive(Debug)]
pub struct LoginFailures {
    per_address: u32,
    per_user: u32,
    by_address: WindowCounter<IpAddr>,
    by_user: WindowCounter<String>,
}

impl LoginFailures {
    /// Limits from `auth.max_failures_per_address`, `auth.max_failures_per_user` (0: none)
    /// within `window`.
    pub fn new(per_address: u32, per_user: u32, window: Duration) -> LoginFailures {
        LoginFailures { per_address, per_user, by_address: WindowCounter::new(window), by_user: WindowCounter::new(window) }
    }

    /// Whether a login from `address` as `user` is refused without a check: the address
    /// failed too often, or the user name did and this address has failures of its own
    /// (so guessing one user's password from many addresses stops, while the user, from
    /// an address that never failed, can still log in).
    pub fn locked(&self, user: Option<&str>, address: IpAddr) -> bool {
        let by_address = self.by_address.count(&address);
        if self.per_address > 0 && by_address >= self.per_address {
            return true;
        }
        match user {
            Some(user) if self.per_user > 0 && by_address > 0 => self.by_user.count(&user.to_owned()) >= self.per_user,
            _ => false,
        }
    }

    /// Records a failed login.
    pub fn record(&self, user: Option<&str>, address: IpAddr) {
        self.by_address.record(&address);
        if let Some(user) = user {
            self.by_user.record(&user.to_owned());
        }
    }

    /// Forgets failures whose window has passed.
    pub fn sweep(&self) {
        self.by_address.sweep();
        self.by_user.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_match_and_expire() {
        let cfg = vec![
            BanConfig { who: "client:bad".into(), until: None },
            BanConfig { who: "user:eve".into(), until: Some(1) },
            BanConfig { who: "ip:192.168.0.0/16".into(), until: None },
        ];
        let bans = Bans::from_config(&cfg).ok().unwrap_or_default();
        assert!(bans.is_banned(&BanTarget::Client("bad".into())));
        assert!(!bans.is_banned(&BanTarget::User("eve".into())), "expired in 1970");
        assert!(bans.is_ip_banned("192.168.4.5".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!bans.is_ip_banned(IpAddr::from([127, 0, 0, 1])));
        assert!(Bans::from_config(&[BanConfig { who: "host:x".into(), until: None }]).is_err());
    }

    #[test]
    fn login_failures_lock_the_address_and_the_user_for_failing_addresses() {
        let f = LoginFailures::new(3, 2, Duration::from_secs(60));
        let (a, b, c) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        f.record(Some("alice"), a);
        f.record(Some("alice"), b);
        assert!(!f.locked(Some("alice"), c), "an address without failures may still try alice");
        assert!(f.locked(Some("alice"), a), "a failing address may not try alice any more");
        assert!(!f.locked(Some("bob"), a));
        f.record(Some("bob"), a);
        f.record(None, a);
        assert!(f.locked(None, a), "the address reached its limit");
        assert!(!f.locked(None, c));
    }

    #[test]
    fn flapping_counts_within_window() {
        let f = Flapping::new(FlappingConfig { enabled: true, max_count: 3, window_secs: 60, ban_secs: 10 });
        assert!(!(0..3).any(|_| f.record("c")));
        assert!(f.record("c"));
        assert!(!f.record("other"));
    }
}
