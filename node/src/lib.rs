//! raftmq-node: the MQTT broker of a raftmq node. One folder per subsystem (see
//! docs/ARCHITECTURE.md for the codemap and the invariants):
//! - [`codec`]: the MQTT 3.1/3.1.1/5.0 wire format, IO-free;
//! - [`net`]: accept loops, TLS and WebSocket under MQTT, connection limits;
//! - [`connection`]: one task per client, from CONNECT to close;
//! - [`broker`]: session lifecycle, publish, subscribe, wills, expiry;
//! - [`session`]: a client id's session slot (queue, inflight, subscriptions);
//! - [`routing`]: the local subscription index and shared subscription groups;
//! - [`security`]: authentication, authorization, passwords, bans, enhanced auth;
//! - [`telemetry`]: counters, Prometheus, `$SYS`, safe and rate-limited logs;
//! - [`admin`]: the admin HTTP API; [`config`]: file, environment and flags;
//! - [`server`]: start and shutdown.
//!
//! Shared state (retained messages, persistent sessions, routes) goes through the store
//! traits of `raftmq-cluster`.

pub mod admin;
pub mod broker;
pub mod codec;
pub mod config;
pub mod connection;
pub mod net;
pub mod routing;
pub mod security;
pub mod server;
pub mod session;
pub mod telemetry;
