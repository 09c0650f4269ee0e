//! Who is at the other end of a connection: the name and kind read from the peer's
//! certificate (already verified against the cluster CA by rustls).

use serde::{Deserialize, Serialize};

/// What a certificate was issued for, encoded in its subject's OU ([`Kind::unit`]) and its
/// extended key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A host's daemon: serves the API and calls other hosts.
    Host,
    /// A user or tool calling the API (the CLI, the controller).
    Client,
}

impl Kind {
    /// The subject OU that marks the kind.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Host => "ferry-host",
            Kind::Client => "ferry-client",
        }
    }

    /// The kind an OU marks.
    pub fn from_unit(unit: &str) -> Option<Kind> {
        match unit {
            "ferry-host" => Some(Kind::Host),
            "ferry-client" => Some(Kind::Client),
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Host => "host",
            Kind::Client => "client",
        })
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Kind::Host),
            "client" => Ok(Kind::Client),
            _ => Err(format!("unknown certificate kind {s:?}: use host or client")),
        }
    }
}

/// The authenticated peer of a connection, inserted into every request's extensions by
/// [`crate::serve_tls`] (an axum handler takes `Extension<PeerIdentity>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The certificate's subject CN: the host's or client's name.
    pub name: String,
    /// Host or client.
    pub kind: Kind,
}

/// Errors reading an identity from a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The certificate is not valid DER X.509.
    #[error("the peer certificate cannot be parsed")]
    Parse,
    /// The subject has no CN.
    #[error("the peer certificate has no common name")]
    NoName,
    /// The subject has no Ferry OU.
    #[error("the peer certificate is neither a Ferry host nor a Ferry client certificate")]
    NoKind,
}

impl PeerIdentity {
    /// Reads the name and kind of a DER certificate. Does not verify it: call it on a
    /// certificate rustls has verified.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| Error::Parse)?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(Error::NoName)?
            .to_string();
        let kind = subject
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok())
            .find_map(Kind::from_unit)
            .ok_or(Error::NoKind)?;
        Ok(PeerIdentity { name, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for kind in [Kind::Host, Kind::Client] {
            assert_eq!(Kind::from_unit(kind.unit()), Some(kind));
            assert_eq!(kind.to_string().parse::<Kind>(), Ok(kind));
        }
        assert!("server".parse::<Kind>().is_err());
        assert_eq!(Kind::from_unit("other"), None);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(PeerIdentity::from_der(b"\x30\x03abc"), Err(Error::Parse)));
    }
}
