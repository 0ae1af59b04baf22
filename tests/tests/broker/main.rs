//! Integration tests of a single raftmq node, one module per area. Tests are named after
//! the normative statement (MQTT-x.y.z-n) or bad-input case (Bn) they prove.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod t10_connect;
mod t12_protocol_gaps;
mod t13_security;
mod t14_ordering;
mod t20_publish;
mod t30_retained;
mod t40_will;
mod t50_session;
mod t55_durability;
mod t60_topics;
mod t70_bad_input;
mod t80_clients;
mod t85_mosquitto;
mod t90_shared;
mod t91_mqtt5;
mod t92_sys_and_limits;
mod t95_transports;
mod t96_auth_acl;
mod t97_paho;
mod t98_admin;
mod t99_bench;
