//! MQTT 5 enhanced authentication (§4.12): the interface an authentication method
//! implements, and the registry the connection consults for CONNECT and re-authentication.
//!
//! No method is built in; a CONNECT naming a method nobody registered gets CONNACK 0x8C.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// The result of one step of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AUTH 0x18 with this data and wait for the client's answer.
    Continue(Bytes),
    /// Authenticated; the optional data goes into CONNACK (or AUTH 0x00 on re-authentication).
    Success(Option<Bytes>),
    /// Refused with this reason code (for example 0x87 Not authorized, 0x86 Bad credentials).
    Failure(u8),
}

/// One enhanced authentication method (SCRAM, Kerberos, a token challenge...).
#[async_trait]
pub trait EnhancedAuth: Send + Sync + 'static {
    /// The Authentication Method name clients send.
    fn method(&self) -> &str;
    /// Runs step `round` (0 for the data in CONNECT or AUTH 0x19) of an exchange for
    /// `client_id`. `state` belongs to this exchange and starts empty.
    async fn step(&self, client_id: &str, round: u32, data: Option<Bytes>, state: &mut Vec<u8>) -> AuthStep;
}

/// The registered methods.
#[derive(Clone, Default)]
pub struct AuthMethods {
    methods: Vec<Arc<dyn EnhancedAuth>>,
}

impl std::fmt::Debug for AuthMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.methods.iter().map(|m| m.method())).finish()
    }
}

impl AuthMethods {
    /// Adds a method; a later one with the same name wins.
    pub fn register(&mut self, method: Arc<dyn EnhancedAuth>) {
        self.methods.retain(|m| m.method() != method.method());
        self.methods.push(method);
    }

    /// The method registered under `name`.
    pub fn find(&self, name: &str) -> Option<Arc<dyn EnhancedAuth>> {
        self.methods.iter().find(|m| m.method() == name).cloned()
    }
}
