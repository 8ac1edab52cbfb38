//! What each operator may do at the collector.
//!
//! Two roles, from the responders' point of view:
//! * **view**: list sessions, read them (export, play, verify), tail them,
//!   read the audit log;
//! * **respond**: all of that, and end sessions, lock users out, unlock them.
//!
//! A certificate first needs the operator role ([`crate::identity`]); a host
//! certificate can never read or act, whatever its name. Then an operator's
//! roles come from two places, and add up: the collector's config
//! (`operators = [names]` grants view; `[collector.roles] name = ["view",
//! "respond"]`) and the certificate itself (`shelltrail:role:view`,
//! `shelltrail:role:respond`, issued with `shelltrail pki issue --role view`
//! or `--role respond`). A name in `denied` gets nothing, whatever its
//! certificate says: without a revocation list, that is how a certificate
//! that grants its own roles is shut out before it expires.

use crate::identity::{Grants, Peer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A role in `[collector.roles]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    View,
    Respond,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    View,
    Respond,
}

impl Need {
    pub fn name(self) -> &'static str {
        match self {
            Need::View => "view",
            Need::Respond => "respond",
        }
    }
}

/// The operators' roles as configured.
#[derive(Debug, Clone, Default)]
pub struct Access {
    by_name: HashMap<String, Grants>,
    denied: HashSet<String>,
}

impl Access {
    /// From `[collector] operators` (view), `[collector.roles]` and
    /// `[collector] denied`. Names are case-insensitive.
    pub fn new(operators: &[String], roles: &BTreeMap<String, Vec<RoleName>>, denied: &[String]) -> Access {
        let mut by_name: HashMap<String, Grants> = HashMap::new();
        for o in operators {
            by_name.entry(o.to_ascii_lowercase()).or_default().view = true;
        }
        for (name, rs) in roles {
            let g = by_name.entry(name.to_ascii_lowercase()).or_default();
            for r in rs {
                match r {
                    RoleName::View => g.view = true,
                    RoleName::Respond => g.respond = true,
                }
            }
        }
        Access {
            by_name,
            denied: denied.iter().map(|d| d.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether the operator `peer` may do what needs `need`, and if not, a
    /// message that says how it could.
    pub fn check(&self, peer: &Peer, need: Need) -> Result<(), String> {
        let name = &peer.name;
        if self.denied.contains(name) {
            return Err(format!("certificate {name:?} is denied ([collector] denied)"));
        }
        let configured = self.by_name.get(name).copied().unwrap_or_default();
        let respond = configured.respond || peer.grants.respond;
        let view = respond || configured.view || peer.grants.view;
        let ok = match need {
            Need::View => view,
            Need::Respond => respond,
        };
        if ok {
            return Ok(());
        }
        let role = need.name();
        Err(if view {
            format!(
                "certificate {name:?} has the view role only, and this needs the {role} role: grant it with \
                 `{name} = [\"respond\"]` in [collector.roles]"
            )
        } else {
            format!(
                "certificate {name:?} has no role at this collector, and this needs the {role} role: grant it with \
                 `{name} = [\"{role}\"]` in [collector.roles] (or list it in [collector] operators for view)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    fn op(name: &str, grants: Grants) -> Peer {
        Peer {
            name: name.into(),
            role: Role::Operator,
            grants,
        }
    }

    #[test]
    fn roles_from_the_config_and_the_certificate_add_up_and_denied_wins() {
        let roles = BTreeMap::from([("Carol".to_string(), vec![RoleName::Respond])]);
        let a = Access::new(&["alice".into()], &roles, &["mallory".into()]);
        let none = Grants::default();
        assert!(a.check(&op("alice", none), Need::View).is_ok());
        assert!(
            a.check(&op("alice", none), Need::Respond)
                .unwrap_err()
                .contains("view role only")
        );
        assert!(a.check(&op("carol", none), Need::Respond).is_ok());
        assert!(a.check(&op("carol", none), Need::View).is_ok(), "respond includes view");
        assert!(a.check(&op("bob", none), Need::View).unwrap_err().contains("no role"));
        let cert_respond = Grants {
            respond: true,
            ..Grants::default()
        };
        assert!(a.check(&op("bob", cert_respond), Need::Respond).is_ok());
        assert!(
            a.check(&op("mallory", cert_respond), Need::View)
                .unwrap_err()
                .contains("denied")
        );
    }
}
