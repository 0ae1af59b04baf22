//! Who may connect and what they may do: the types every part of security shares live
//! here; the authenticator chain ([`authn`]), the ACL ([`acl`]) and their bundle
//! ([`policy`]) a SIGHUP swaps whole, the password file ([`passwd`]) and the pool its
//! checks run on ([`verify_pool`]), bans and login limits ([`bans`]), and MQTT 5 enhanced
//! authentication ([`enhanced`]). A reload that fails keeps the previous settings (fail
//! closed, CVE-2017-7652).

pub mod acl;
pub mod authn;
pub mod bans;
pub mod enhanced;
pub mod passwd;
pub mod policy;
pub mod verify_pool;

use std::net::IpAddr;

/// A security file or setting that cannot be used; the broker refuses to start with it.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// File.
        file: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of a file is invalid.
    #[error("{file}:{line}: {reason}")]
    File {
        /// File.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Password hashing failed.
    #[error("password hashing: {0}")]
    Hash(String),
}

/// What a connecting client presents.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// Client identifier.
    pub client_id: &'a str,
    /// User name from CONNECT (or from the client certificate).
    pub username: Option<&'a str>,
    /// Password from CONNECT.
    pub password: Option<&'a [u8]>,
    /// The user name was taken from a verified client certificate.
    pub certificate_verified: bool,
    /// Peer address.
    pub peer: IpAddr,
}

/// Which authenticator vouched for an identity (a reload re-checks password users).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdentitySource {
    /// No credentials, accepted by `allow_anonymous`.
    #[default]
    Anonymous,
    /// No authenticator configured: the user name was taken unchecked.
    Unchecked,
    /// The password file.
    Password,
    /// A JSON Web Token (the user name is its configured claim).
    Jwt,
    /// A verified client certificate.
    Certificate,
    /// An MQTT 5 enhanced authentication method.
    Enhanced,
}

/// Who a client turned out to be: what ACL rules are matched against, and who owns the
/// sessions it creates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// How it was established.
    pub source: IdentitySource,
    /// User name, if any.
    pub username: Option<String>,
    /// String claims of a JWT, for `%{claim}` ACL placeholders (a B-tree: no allocation
    /// and a small footprint for the many clients without claims).
    pub claims: std::collections::BTreeMap<String, String>,
}

/// Who attaches to a session: the owner a new session records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The authenticated identity.
    pub identity: Identity,
    /// The client's address when it attached (for ACL rules by address).
    pub peer: std::net::SocketAddr,
}

/// The authentication decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Connect as this identity.
    Accept(Identity),
    /// Credentials were given and are wrong (CONNACK 0x86 / 0x04).
    BadCredentials,
    /// No acceptable credentials (CONNACK 0x87 / 0x05).
    NotAuthorized,
}
