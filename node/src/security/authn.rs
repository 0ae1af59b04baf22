//! The authenticator chain: password file, JWT (the user name from a claim), anonymous
//! access.

use std::collections::HashMap;
use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::passwd::PasswordFile;
use super::{Credentials, Identity, IdentitySource, SecurityError, Verdict};
use crate::config::{AuthSource, Config, JwtAlgorithm, JwtConfig};
use crate::telemetry::printable::Printable;

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
