//! What the workload's clients did and saw, with the time of each event: the input of the
//! checker. Every message carries `publisher:id` as its payload, so a receipt names the
//! send it belongs to.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One thing a client did or saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A subscriber's SUBACK granted its subscription (messages sent after it are owed).
    Subscribed { subscriber: String },
    /// A publisher sent a message for the first time (resends are not events).
    Sent { publisher: String, id: u64, qos: u8, retain: bool },
    /// The broker acknowledged it (PUBACK, or PUBREC for QoS 2, with a success code).
    Acked { publisher: String, id: u64 },
    /// The broker refused it (a failure code): not owed to anyone.
    Refused { publisher: String, id: u64, code: u8 },
    /// A subscriber received a message: for QoS 2 only a new packet (not a resend of one
    /// awaiting PUBREL), for QoS 1 every copy; with its packet id and DUP flag (for the
    /// reader of a failure).
    Received { subscriber: String, publisher: String, id: u64, qos: u8, packet_id: u16, dup: bool },
    /// A client's connection was accepted on node `node`; `resumed` is Session Present.
    Connected { client: String, node: usize, resumed: bool },
    /// A client reconnected with Clean Start 0 and the broker had no session for it.
    SessionLost { client: String },
    /// The retained message a node holds for a publisher's retained topic at the end.
    RetainedSeen { node: usize, publisher: String, id: u64 },
    /// A fault was injected (for the report's timings).
    Fault { what: String },
    /// The fault was healed (node restarted or resumed).
    Healed { what: String },
}

/// An event and when it happened (since the history began).
#[derive(Debug, Clone)]
pub struct Entry {
    pub at: Duration,
    pub event: Event,
}

/// The history of one run; clients on many tasks record into it.
pub struct History {
    started: Instant,
    entries: Mutex<Vec<Entry>>,
}

impl History {
    pub fn new() -> History {
        History { started: Instant::now(), entries: Mutex::new(Vec::new()) }
    }

    pub fn record(&self, event: Event) {
        let at = self.started.elapsed();
        if let Ok(mut entries) = self.entries.lock() {
            entries.push(Entry { at, event });
        }
    }

    /// Everything so far, in the order recorded.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// How many messages have been acknowledged so far.
    pub fn acked(&self) -> usize {
        self.entries.lock().map(|e| e.iter().filter(|e| matches!(e.event, Event::Acked { .. })).count()).unwrap_or(0)
    }
}

/// The payload naming a message.
pub fn payload(publisher: &str, id: u64) -> Vec<u8> {
    format!("{publisher}:{id}").into_bytes()
}

/// The message a payload names.
pub fn parse(payload: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (publisher, id) = text.rsplit_once(':')?;
    Some((publisher.to_owned(), id.parse().ok()?))
}
