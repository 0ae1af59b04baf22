//! raftmq-node: the MQTT broker.
pub mod codec;
