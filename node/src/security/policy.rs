//! The security bundle in force: authenticator chain, ACL and the default policy.

use std::net::IpAddr;

use super::acl::{Access, Acl, Subject};
use super::authn::Authenticator;
use super::{IdentitySource, SecurityError};
use crate::config::Config;

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
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d.
        let peer = subject.peer.to_canonical();
        !anonymous || self.trusted.iter().any(|net| net.contains(&peer))
    }
}
