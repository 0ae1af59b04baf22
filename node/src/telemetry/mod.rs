//! What the broker tells operators: counters ([`stats`]), the Prometheus exposition
//! ([`metrics`]), `$SYS` topics and client events ([`sys`]), and log lines that client input
//! cannot forge ([`printable`]) or flood ([`log_limit`]).

pub mod log_limit;
pub mod metrics;
pub mod printable;
pub mod stats;
pub mod sys;
