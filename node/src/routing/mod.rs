//! Where messages go: the local subscription index ([`index`]) and shared subscription
//! groups with their balancing strategies ([`shared`]).

pub mod index;
pub mod shared;
