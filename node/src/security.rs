//! Who may connect: the authenticator chain (password file, JWT, anonymous access) and the
//! ACL, bundled so a SIGHUP can replace them together. A reload that fails keeps the
//! previous settings (fail closed, CVE-2017-7652).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::acl::{Access, Acl, Subject};
use crate::config::{AuthSource, Config, JwtAlgorithm, JwtConfig};
use crate::passwd::PasswordFile;
use crate::printable::Printable;

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

enum Outcome {
    Accept(Identity),
    /// Wrong credentials.
    Deny,
    /// Valid credentials for another user than CONNECT names.
    Refuse,
    Ignore,
}

/// JWT verification: the token travels in the password field.
struct JwtAuth {
    key: DecodingKey,
    validation: Validation,
    username_claim: String,
}

impl JwtAuth {
    fn from_config(cfg: &JwtConfig) -> Result<JwtAuth, SecurityError> {
        let read_key = |path: &Option<PathBuf>| -> Result<Vec<u8>, SecurityError> {
            let path =
                path.as_ref().ok_or_else(|| SecurityError::Invalid("auth.jwt.public_key_file is required for RS256/ES256".into()))?;
            std::fs::read(path).map_err(|e| SecurityError::Read { file: path.display().to_string(), source: e })
        };
        let invalid = |e: jsonwebtoken::errors::Error| SecurityError::Invalid(format!("auth.jwt key: {e}"));
        let (key, algorithm) = match cfg.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = cfg.secret.as_deref().filter(|s| !s.is_empty());
                let secret = secret.ok_or_else(|| SecurityError::Invalid("auth.jwt.secret is required for HS256".into()))?;
                (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
            }
            JwtAlgorithm::RS256 => (DecodingKey::from_rsa_pem(&read_key(&cfg.public_key_file)?).map_err(invalid)?, Algorithm::RS256),
            JwtAlgorithm::ES256 => (DecodingKey::from_ec_pem(&read_key(&cfg.public_key_file)?).map_err(invalid)?, Algorithm::ES256),
        };
        // `exp` is required and checked.
        let validation = Validation::new(algorithm);
        if cfg.username_claim.is_empty() {
            return Err(SecurityError::Invalid("auth.jwt.username_claim must not be empty".into()));
        }
        Ok(JwtAuth { key, validation, username_claim: cfg.username_claim.clone() })
    }

    fn check(&self, creds: &Credentials<'_>) -> Outcome {
        let Some(token) = creds.password.and_then(|p| std::str::from_utf8(p).ok()) else { return Outcome::Ignore };
        if token.split('.').count() != 3 {
            return Outcome::Ignore;
        }
        match jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(token, &self.key, &self.validation) {
            Ok(data) => {
                let claims: std::collections::BTreeMap<String, String> = data
                    .claims
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        serde_json::Value::String(s) => Some((k, s)),
                        serde_json::Value::Number(n) => Some((k, n.to_string())),
                        serde_json::Value::Bool(b) => Some((k, b.to_string())),
                        _ => None,
                    })
                    .collect();
                // The token, not CONNECT, says who the client is.
                let Some(user) = claims.get(&self.username_claim).filter(|u| !u.is_empty()).cloned() else {
                    tracing::debug!(client_id = %Printable(creds.client_id), claim = %self.username_claim, "JWT without the user name claim");
                    return Outcome::Deny;
                };
                if creds.username.is_some_and(|u| u != user) {
                    tracing::debug!(client_id = %Printable(creds.client_id), "CONNECT user name differs from the JWT's");
                    return Outcome::Refuse;
                }
                Outcome::Accept(Identity { source: IdentitySource::Jwt, username: Some(user), claims })
            }
            Err(e) => {
                tracing::debug!(client_id = %Printable(creds.client_id), error = %e, "JWT rejected");
                Outcome::Deny
            }
        }
    }
}

/// The authenticator chain.
pub struct Authenticator {
    passwords: Option<PasswordFile>,
    jwt: Option<JwtAuth>,
    chain: Vec<AuthSource>,
    allow_anonymous: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("password_users", &self.passwords.as_ref().map(PasswordFile::len))
            .field("jwt", &self.jwt.is_some())
            .field("chain", &self.chain)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

impl Authenticator {
    /// Builds the chain from configuration, reading its files.
    pub fn from_config(config: &Config) -> Result<Authenticator, SecurityError> {
        let auth = &config.auth;
        let passwords = auth.password_file.as_deref().map(PasswordFile::load).transpose()?;
        let jwt = auth.jwt.as_ref().map(JwtAuth::from_config).transpose()?;
        let mut chain = auth.chain.clone();
        if chain.is_empty() {
            chain = vec![AuthSource::PasswordFile, AuthSource::Jwt];
        }
        for source in &chain {
            let configured = match source {
                AuthSource::PasswordFile => passwords.is_some(),
                AuthSource::Jwt => jwt.is_some(),
            };
            if !configured && !auth.chain.is_empty() {
                return Err(SecurityError::Invalid(format!("auth.chain names {source:?}, which is not configured")));
            }
        }
        let any = passwords.is_some() || jwt.is_some();
        Ok(Authenticator { passwords, jwt, chain, allow_anonymous: auth.allow_anonymous.unwrap_or(!any) })
    }

    /// Whether [`Authenticator::check`] may block (it hashes passwords).
    pub fn is_blocking(&self) -> bool {
        self.passwords.is_some()
    }

    /// Decides on a client. Blocking when [`Authenticator::is_blocking`]: call it from a
    /// blocking thread then.
    pub fn check(&self, creds: &Credentials<'_>) -> Verdict {
        let named = |source| Identity { source, username: creds.username.map(str::to_owned), claims: Default::default() };
        if creds.certificate_verified {
            return Verdict::Accept(named(IdentitySource::Certificate));
        }
        if creds.username.is_none() && creds.password.is_none() {
            return if self.allow_anonymous { Verdict::Accept(Identity::default()) } else { Verdict::NotAuthorized };
        }
        let mut tried = false;
        for source in &self.chain {
            let outcome = match source {
                AuthSource::PasswordFile => match (&self.passwords, creds.username) {
                    (Some(file), Some(user)) => {
                        // An unknown user is checked against a dummy hash: both take as
                        // long, so timing does not tell which user names exist.
                        match (file.verify(user, creds.password.unwrap_or_default()), file.contains(user)) {
                            (true, _) => Outcome::Accept(named(IdentitySource::Password)),
                            (false, true) => Outcome::Deny,
                            (false, false) => Outcome::Ignore,
                        }
                    }
                    _ => Outcome::Ignore,
                },
                AuthSource::Jwt => self.jwt.as_ref().map_or(Outcome::Ignore, |j| j.check(creds)),
            };
            match outcome {
                Outcome::Accept(identity) => return Verdict::Accept(identity),
                Outcome::Deny => return Verdict::BadCredentials,
                Outcome::Refuse => return Verdict::NotAuthorized,
                Outcome::Ignore => tried |= self.passwords.is_some() || self.jwt.is_some(),
            }
        }
        if !tried && self.allow_anonymous {
            // No authenticator configured at all: credentials are not checked.
            return Verdict::Accept(named(IdentitySource::Unchecked));
        }
        Verdict::BadCredentials
    }

    /// Whether an identity accepted earlier would still be accepted as far as a reload can
    /// tell without credentials: password users must still be in the file, anonymous
    /// clients need `allow_anonymous`.
    pub fn still_valid(&self, identity: &Identity) -> bool {
        match identity.source {
            IdentitySource::Anonymous => self.allow_anonymous,
            IdentitySource::Password => match (&self.passwords, identity.username.as_deref()) {
                (Some(file), Some(user)) => file.contains(user),
                _ => false,
            },
            IdentitySource::Unchecked => self.passwords.is_none() && self.jwt.is_none() && self.allow_anonymous,
            IdentitySource::Jwt | IdentitySource::Certificate | IdentitySource::Enhanced => true,
        }
    }
}

/// Authentication and authorization in force; replaced whole on reload.
#[derive(Debug)]
pub struct Security {
    /// The authenticator chain.
    pub authenticator: Authenticator,
    /// The ACL, if a file is configured.
    pub acl: Option<Acl>,
    /// Addresses trusted by the default policy (`acl.trusted_networks`).
    trusted: Vec<ipnet::IpNet>,
}

impl Security {
    /// Loads every security file named in `config`.
    pub fn load(config: &Config) -> Result<Security, SecurityError> {
        let authenticator = Authenticator::from_config(config)?;
        let acl = match &config.acl.file {
            Some(path) => Some(Acl::load(path, config.acl.no_match.unwrap_or(crate::config::AclDecision::Deny))?),
            None => None,
        };
        let trusted = config
            .acl
            .trusted_networks
            .iter()
            .map(|n| {
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| SecurityError::Invalid(format!("acl.trusted_networks: {n:?} is not an address or network")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Security { authenticator, acl, trusted })
    }

    /// Whether `subject` may perform `access` on `topic`: the ACL when a file is
    /// configured, else the default policy. The default policy (EMQX's) keeps `$SYS/#`
    /// (client events carry every client's address and user name) and a bare `#` from
    /// clients that are both unauthenticated and outside `acl.trusted_networks`.
    pub fn allows(&self, subject: &Subject<'_>, access: Access, topic: &str) -> bool {
        if let Some(acl) = &self.acl {
            return acl.allows(subject, access, topic);
        }
        if access == Access::Publish || !(topic == "#" || topic.starts_with("$SYS")) {
            return true;
        }
        let anonymous = matches!(subject.identity.source, IdentitySource::Anonymous | IdentitySource::Unchecked);
        !anonymous || self.trusted.iter().any(|net| net.contains(&subject.peer))
    }
}
