//! The ACL: ordered allow/deny rules, first match wins.
//!
//! File format, one rule per line (`#` comments and blank lines are skipped):
//!
//! ```text
//! allow  user:alice      publish    sensors/%u/#
//! allow  client:gw-1     both       eq cmd/+/raw
//! deny   ip:10.0.0.0/8   subscribe  #
//! allow  all             subscribe  $SYS/#  public/%c/+  devices/%{tenant}/#
//! ```
//!
//! `who` is `all`, `user:NAME`, `client:ID` or `ip:ADDRESS[/PREFIX]`; the action is
//! `publish`, `subscribe` or `both`; each filter may use `%u` (user name), `%c` (client id)
//! and `%{claim}` (a JWT claim), or be preceded by `eq` to be taken literally. An identity
//! containing `+`, `#` or `/` never matches a placeholder (CVE-2017-7650).
//!
//! A subscription is allowed only by a rule that covers every topic its filter can match,
//! and denied by any deny rule that overlaps it, so a wildcard cannot widen access.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::config::AclDecision;
use crate::security::{Identity, SecurityError};

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Publish to a topic name.
    Publish,
    /// Subscribe to a topic filter (without any `$share/{group}/` prefix).
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    All,
    User(String),
    Client(String),
    Net(IpNet),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Publish,
    Subscribe,
    Both,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleFilter {
    text: String,
    literal: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    decision: AclDecision,
    who: Who,
    action: Action,
    filters: Vec<RuleFilter>,
}

/// The subject of a check.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Client identifier.
    pub client_id: &'a str,
    /// Authenticated identity.
    pub identity: &'a Identity,
    /// Peer address.
    pub peer: IpAddr,
}

/// Parsed ACL rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
    no_match: AclDecision,
}

impl Acl {
    /// Parses rules; an ACL without any rule is refused (CVE-2018-12550: an empty file must
    /// not mean "allow everything").
    pub fn parse(text: &str, origin: &str, no_match: AclDecision) -> Result<Acl, SecurityError> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: String| SecurityError::File { file: origin.to_owned(), line: n + 1, reason: why };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut tokens = line.split_whitespace();
            let decision = match tokens.next() {
                Some("allow") => AclDecision::Allow,
                Some("deny") => AclDecision::Deny,
                other => return Err(bad(format!("expected allow or deny, found {other:?}"))),
            };
            let who = match tokens.next() {
                Some("all") => Who::All,
                Some(w) => match w.split_once(':') {
                    Some(("user", name)) if !name.is_empty() => Who::User(name.to_owned()),
                    Some(("client", id)) if !id.is_empty() => Who::Client(id.to_owned()),
                    Some(("ip", addr)) => Who::Net(parse_net(addr).ok_or_else(|| bad(format!("invalid address {addr}")))?),
                    _ => return Err(bad(format!("invalid subject {w}"))),
                },
                None => return Err(bad("missing subject".into())),
            };
            let action = match tokens.next() {
                Some("publish") => Action::Publish,
                Some("subscribe") => Action::Subscribe,
                Some("both") => Action::Both,
                other => return Err(bad(format!("expected publish, subscribe or both, found {other:?}"))),
            };
            let mut filters = Vec::new();
            while let Some(token) = tokens.next() {
                let (text, literal) =
                    if token == "eq" { (tokens.next().ok_or_else(|| bad("eq without a filter".into()))?, true) } else { (token, false) };
                raftmq_cluster::topic::validate_topic_filter(text, usize::MAX).map_err(|e| bad(format!("invalid filter {text}: {e}")))?;
                filters.push(RuleFilter { text: text.to_owned(), literal });
            }
            if filters.is_empty() {
                return Err(bad("rule without topic filters".into()));
            }
            rules.push(Rule { decision, who, action, filters });
        }
        if rules.is_empty() {
            return Err(SecurityError::Invalid(format!("{origin}: the ACL file has no rules")));
        }
        Ok(Acl { rules, no_match })
    }

    /// Reads and parses an ACL file.
    pub fn load(path: &Path, no_match: AclDecision) -> Result<Acl, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|e| SecurityError::Read { file: path.display().to_string(), source: e })?;
        Acl::parse(&text, &path.display().to_string(), no_match)
    }

    /// Whether `subject` may perform `access` on `topic` (a topic name for publish, a
    /// filter for subscribe).
    pub fn allows(&self, subject: &Subject<'_>, access: Access, topic: &str) -> bool {
        for rule in &self.rules {
            let applies = match rule.action {
                Action::Both => true,
                Action::Publish => access == Access::Publish,
                Action::Subscribe => access == Access::Subscribe,
            };
            if !applies || !who_matches(&rule.who, subject) {
                continue;
            }
            for filter in &rule.filters {
                let Some(expanded) = expand(filter, subject) else { continue };
                let hit = match (access, filter.literal, rule.decision) {
                    (_, true, _) => expanded == topic,
                    (Access::Publish, false, _) => raftmq_cluster::topic::matches(&expanded, topic),
                    (Access::Subscribe, false, AclDecision::Allow) => covers(&expanded, topic),
                    (Access::Subscribe, false, AclDecision::Deny) => overlaps(&expanded, topic),
                };
                if hit {
                    return rule.decision == AclDecision::Allow;
                }
            }
        }
        self.no_match == AclDecision::Allow
    }
}

fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>().ok().or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

fn who_matches(who: &Who, s: &Subject<'_>) -> bool {
    match who {
        Who::All => true,
        Who::User(name) => s.identity.username.as_deref() == Some(name.as_str()),
        Who::Client(id) => s.client_id == id,
        Who::Net(net) => net.contains(&s.peer),
    }
}

/// Replaces placeholders; `None` when a needed identity is missing or could widen the
/// filter (contains `+`, `#` or `/`).
fn expand(filter: &RuleFilter, s: &Subject<'_>) -> Option<String> {
    if filter.literal || !filter.text.contains('%') {
        return Some(filter.text.clone());
    }
    let safe = |v: &str| !v.is_empty() && !v.contains(['+', '#', '/']);
    let mut out = String::with_capacity(filter.text.len());
    let mut rest = filter.text.as_str();
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let (value, used) = if rest.starts_with("%u") {
            (s.identity.username.clone()?, 2)
        } else if rest.starts_with("%c") {
            (s.client_id.to_owned(), 2)
        } else if let Some(body) = rest.strip_prefix("%{") {
            let end = body.find('}')?;
            (s.identity.claims.get(&body[..end])?.clone(), end + 3)
        } else {
            ("%".to_owned(), 1)
        };
        if value != "%" && !safe(&value) {
            return None;
        }
        out.push_str(&value);
        rest = &rest[used..];
    }
    out.push_str(rest);
    Some(out)
}

/// Whether every topic `sub` can match is matched by `rule`.
pub fn covers(rule: &str, sub: &str) -> bool {
    if sub.starts_with('$') != rule.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        return false;
    }
    let (mut r, mut s) = (rule.split('/'), sub.split('/'));
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic matches both `rule` and `sub`.
pub fn overlaps(rule: &str, sub: &str) -> bool {
    let (mut r, mut s) = (rule.split('/'), sub.split('/'));
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(client_id: &'a str, identity: &'a Identity) -> Subject<'a> {
        Subject { client_id, identity, peer: IpAddr::from([10, 1, 2, 3]) }
    }

    fn user(name: &str) -> Identity {
        Identity { username: Some(name.into()), ..Default::default() }
    }

    const RULES: &str = "
        # sensors publish under their own name
        allow user:alice publish sensors/%u/#
        deny  all        subscribe secret/#
        allow all        subscribe sensors/+/temp  home/%c/#  eq cmd/+/raw
        allow ip:10.0.0.0/8 publish lan/#
    ";

    #[test]
    fn placeholders_wildcards_and_first_match() {
        let acl = Acl::parse(RULES, "t", AclDecision::Deny).ok().unwrap_or_else(|| Acl { rules: vec![], no_match: AclDecision::Allow });
        let alice = user("alice");
        let s = subject("c1", &alice);
        assert!(acl.allows(&s, Access::Publish, "sensors/alice/t"));
        assert!(!acl.allows(&s, Access::Publish, "sensors/bob/t"));
        assert!(acl.allows(&s, Access::Subscribe, "sensors/+/temp"));
        assert!(acl.allows(&s, Access::Subscribe, "sensors/x/temp"));
        assert!(!acl.allows(&s, Access::Subscribe, "sensors/#"), "a wider filter is not covered");
        assert!(acl.allows(&s, Access::Subscribe, "home/c1/#"));
        assert!(!acl.allows(&s, Access::Subscribe, "home/c2/#"));
        assert!(acl.allows(&s, Access::Subscribe, "cmd/+/raw"), "eq matches the literal filter");
        assert!(!acl.allows(&s, Access::Subscribe, "cmd/x/raw"), "eq is literal");
        assert!(!acl.allows(&s, Access::Subscribe, "#"), "overlaps the deny rule");
        assert!(acl.allows(&s, Access::Publish, "lan/x"));
    }

    #[test]
    fn b8_identities_with_wildcards_never_match_placeholders() {
        let acl = Acl::parse("allow all both home/%c/#\nallow user:x publish u/%u", "t", AclDecision::Deny).ok();
        let acl = acl.unwrap_or_else(|| Acl { rules: vec![], no_match: AclDecision::Allow });
        let anyone = Identity::default();
        assert!(!acl.allows(&subject("#", &anyone), Access::Subscribe, "home/#"));
        assert!(!acl.allows(&subject("+", &anyone), Access::Subscribe, "home/+/#"));
        assert!(!acl.allows(&subject("a/b", &anyone), Access::Publish, "home/a/b/c"));
        assert!(acl.allows(&subject("ok", &anyone), Access::Publish, "home/ok/c"));
    }

    #[test]
    fn jwt_claims_fill_placeholders() {
        let acl = Acl::parse("allow all both t/%{tenant}/#", "t", AclDecision::Deny).ok();
        let acl = acl.unwrap_or_else(|| Acl { rules: vec![], no_match: AclDecision::Allow });
        let mut id = Identity::default();
        id.claims.insert("tenant".into(), "acme".into());
        assert!(acl.allows(&subject("c", &id), Access::Publish, "t/acme/x"));
        assert!(!acl.allows(&subject("c", &id), Access::Publish, "t/other/x"));
        assert!(!acl.allows(&subject("c", &Identity::default()), Access::Publish, "t/acme/x"));
    }

    #[test]
    fn b35_bad_and_empty_acl_files_fail_closed() {
        for bad in [
            "",
            "\n\n# only comments\n",
            "permit all publish a",
            "allow nobody publish a",
            "allow all read a",
            "allow all publish",
            "allow all publish a/#/b",
            "allow ip:999.1.1.1 publish a",
        ] {
            assert!(Acl::parse(bad, "t", AclDecision::Deny).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cover_and_overlap() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("#", "a/+/c"));
        assert!(!covers("#", "$SYS/x"));
        assert!(overlaps("a/b", "a/#"));
        assert!(overlaps("a/+", "+/b"));
        assert!(!overlaps("a/b", "a/c"));
    }
}
