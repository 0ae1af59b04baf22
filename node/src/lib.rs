//! raftmq-node: the MQTT broker of a raftmq node.
//!
//! Layout (see docs/ARCHITECTURE.md for the invariants):
//! - [`codec`]: the MQTT 3.1/3.1.1/5.0 wire format, IO-free;
//! - [`connection`]: one task per client, from CONNECT to close;
//! - [`session`]: a client id's session slot (queue, inflight, subscriptions);
//! - [`router`]: the local subscription index;
//! - [`shared`]: shared subscriptions and their strategies;
//! - [`broker`]: sessions, routing, wills, expiry;
//! - [`listener`] and [`server`]: accepting connections, start and shutdown;
//! - [`transport`]: TLS and WebSocket under MQTT;
//! - [`security`], [`passwd`], [`acl`], [`banned`]: authentication, authorization, bans;
//! - [`auth`]: the MQTT 5 enhanced authentication interface;
//! - [`sys`]: `$SYS` topics and client events;
//! - [`config`]: file, environment and flags;
//! - [`printable`] and [`log_limit`]: client strings made safe for log lines, and
//!   lines a client can provoke rate-limited;
//! - [`rate`]: the token bucket of publish and connection rates;
//! - [`verify_pool`]: password checks on a fixed pool with a bounded queue.
//!
//! Shared state (retained messages, persistent sessions, routes) goes through the store
//! traits of `raftmq-cluster`.

pub mod acl;
pub mod admin;
pub mod auth;
pub mod banned;
pub mod broker;
pub mod codec;
pub mod config;
pub mod connection;
pub mod listener;
pub mod log_limit;
pub mod metrics;
pub mod passwd;
pub mod printable;
pub mod rate;
pub mod router;
pub mod security;
pub mod server;
pub mod session;
pub mod shared;
pub mod sys;
pub mod transport;
pub mod verify_pool;
