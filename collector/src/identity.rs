//! Who a client certificate speaks for, and what it may do.
//!
//! The TLS layer ([`crate::tls`]) has already checked that the certificate
//! chains to the client CA. One CA signs a whole fleet, hosts and operators
//! alike, so a name cannot tell them apart: a host named like an operator
//! would read every recording, and an operator's certificate would ship
//! sessions as a host of that name. Every client certificate therefore
//! carries its role, and the services check it before the name:
//! [`Role::Host`] may only use Ingest, [`Role::Operator`] only Query.
//!
//! The role is a URI subjectAltName, `shelltrail:role:host` or
//! `shelltrail:role:operator` (`shelltrail pki issue --role`). An operator's
//! certificate may also carry what it may do, `shelltrail:role:view` and
//! `shelltrail:role:respond` (each implies operator); otherwise the
//! collector's config says (see [`crate::access`]). A URI rather
//! than an extended key usage of our own: an EKU needs an object identifier,
//! and shelltrail has no registered arc to take one from (the UUID arc
//! 2.25 does not fit the 64-bit arcs rcgen writes); a URI needs no
//! registration, `openssl x509 -text` shows it as `URI:shelltrail:role:host`,
//! and any other CA (openssl, step-ca, Vault) can put one in with a
//! `subjectAltName = URI:...` line. It sits beside the DNS names, so the
//! host's name (the first DNS name) is unchanged.

use crate::store::valid_host;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What a client certificate's URI subjectAltName starts with to name its role.
pub const ROLE_URI_PREFIX: &str = "shelltrail:role:";

/// What a client certificate may do at the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: ships its host's sessions (Ingest), never reads.
    Host,
    /// A person: lists and reads sessions (Query), never ships.
    Operator,
}

impl Role {
    /// The word used in the URI and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Operator => "operator",
        }
    }

    /// The subjectAltName URI that carries this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a client certificate names no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the client certificate does not parse: {0}")]
    Parse(String),
    #[error("the client certificate names no host: no DNS subjectAltName and no subject CN")]
    NoName,
    #[error("the client certificate's host name {0:?} is not a valid host name")]
    InvalidName(String),
    #[error(
        "the client certificate {name:?} carries no role (issued before certificates had roles, or by another \
         tool): reissue it with `shelltrail pki issue DIR {name} --role host` for an agent or `--role operator` \
         for an operator, or add the subjectAltName URI:{ROLE_URI_PREFIX}host or URI:{ROLE_URI_PREFIX}operator"
    )]
    NoRole { name: String },
    #[error("the client certificate {name:?} has the role {role:?}, which is not one of host, operator, view, respond")]
    UnknownRole { name: String, role: String },
    #[error("the client certificate {name:?} claims both roles, host and operator: issue one certificate per role")]
    TwoRoles { name: String },
}

/// What an operator's certificate itself grants, beside what the
/// collector's config grants its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grants {
    /// `shelltrail:role:view`: list, export, play, verify, tail.
    pub view: bool,
    /// `shelltrail:role:respond`: also kill, lock, unlock.
    pub respond: bool,
}

/// A verified client: the name its certificate gives, and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub role: Role,
    /// Empty for hosts.
    pub grants: Grants,
}

/// The name and role of a client certificate (DER); see [`host_from_certificate`] for the name.
pub fn peer_from_certificate(der: &[u8]) -> Result<Peer, IdentityError> {
    let cert = parse(der)?;
    let name = name_of(&cert)?;
    let mut roles = Vec::new();
    let mut grants = Grants::default();
    for uri in general_names(&cert)?.into_iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(u),
        _ => None,
    }) {
        if let Some(word) = uri.strip_prefix(ROLE_URI_PREFIX) {
            roles.push(match word {
                "host" => Role::Host,
                "operator" => Role::Operator,
                "view" => {
                    grants.view = true;
                    Role::Operator
                }
                "respond" => {
                    grants.respond = true;
                    Role::Operator
                }
                other => {
                    return Err(IdentityError::UnknownRole {
                        name,
                        role: other.chars().take(64).collect(),
                    });
                }
            });
        }
    }
    roles.sort_by_key(|r| r.name());
    roles.dedup();
    match roles[..] {
        [] => Err(IdentityError::NoRole { name }),
        [role] => Ok(Peer { name, role, grants }),
        _ => Err(IdentityError::TwoRoles { name }),
    }
}

/// The host a client certificate (DER) names: its first DNS
/// subjectAltName, else its subject common name, lowercased (host names are
/// case-insensitive, and each host must map to one directory).
pub fn host_from_certificate(der: &[u8]) -> Result<String, IdentityError> {
    name_of(&parse(der)?)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| IdentityError::Parse(e.to_string()))
}

fn general_names<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a GeneralName<'a>>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    Ok(san
        .map(|ext| ext.value.general_names.iter().collect())
        .unwrap_or_default())
}

fn name_of(cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
    let dns = general_names(cert)?.into_iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some(name.to_string()),
        _ => None,
    });
    let name = match dns {
        Some(n) => n,
        None => cert
            .subject()
            .iter_common_name()
            .next()
            .map(|cn| cn.as_str().map(str::to_owned))
            .transpose()
            .map_err(|e| IdentityError::Parse(e.to_string()))?
            .ok_or(IdentityError::NoName)?,
    };
    let name = name.to_ascii_lowercase();
    if valid_host(&name) {
        Ok(name)
    } else {
        Err(IdentityError::InvalidName(name.chars().take(64).collect()))
    }
}
