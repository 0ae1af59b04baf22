//! The network edge: accept loops and their limits ([`listener`]), TLS and WebSocket under
//! MQTT ([`transport`]), and the token bucket of connection and publish rates ([`rate`]).

pub mod listener;
pub mod rate;
pub mod transport;
