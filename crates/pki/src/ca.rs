//! The cluster CA and the certificates it issues.
//!
//! A CA directory holds `ca.pem` (the CA certificate) and `ca.key` (its private key, 0600).
//! An identity directory holds `cert.pem`, `key.pem` (0600) and `ca.pem` (a copy of the
//! CA certificate, the only certificate the identity trusts).
//!
//! Every issued certificate has the subject `CN=<name>, OU=<kind's unit>, O=Ferry cluster`,
//! where the unit is [`Kind::unit`] (`ferry-host` or `ferry-client`). A host certificate has
//! the extended key usages serverAuth and clientAuth (a host serves the API and calls other
//! hosts); a client certificate has clientAuth only, so it cannot act as a server.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::Serialize;

use crate::files::{self, CA_CERT, CA_KEY, CERT, CERT_MODE, KEY, KEY_MODE};
use crate::identity::Kind;

/// The organisation of every certificate Ferry issues.
pub const ORGANIZATION: &str = "Ferry cluster";
/// How long a CA certificate is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a host or client certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * 86_400);
/// How far back `notBefore` is set, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Longest accepted name.
const MAX_NAME: usize = 64;

/// Errors creating the CA or issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error(transparent)]
    Files(#[from] files::Error),
    /// The name is not usable in a certificate.
    #[error("invalid name {0:?}: use 1 to 64 letters, digits, '.', '-' or '_'")]
    InvalidName(String),
    /// A subject alternative name is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}: give a DNS name or an IP address")]
    InvalidSan(String),
    /// The CA key does not belong to the CA certificate.
    #[error("{key} is not the key of {cert}")]
    KeyMismatch {
        /// The CA key file.
        key: PathBuf,
        /// The CA certificate file.
        cert: PathBuf,
    },
    /// The CA certificate cannot be parsed or is not a CA.
    #[error("{path} is not a usable CA certificate")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// Key generation, parsing or signing failed.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
}

/// What `ca init` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CaFiles {
    /// The CA certificate.
    pub cert: PathBuf,
    /// The CA private key (mode 0600).
    pub key: PathBuf,
    /// The CA's subject common name.
    pub common_name: String,
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The host's or client's name (the certificate's CN).
    pub name: String,
    /// Host or client.
    pub kind: Kind,
    /// Subject alternative names: DNS names or IP addresses.
    pub sans: Vec<String>,
}

/// What `ca issue` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// The private key (mode 0600).
    pub key: PathBuf,
    /// The copy of the CA certificate.
    pub ca: PathBuf,
    /// The certificate's name (CN).
    pub name: String,
    /// Host or client.
    pub kind: Kind,
    /// The subject alternative names in the certificate.
    pub sans: Vec<String>,
}

/// Creates a new cluster CA in `dir` (created if missing): `dir/ca.pem` and `dir/ca.key`
/// (0600). Refuses, writing nothing, if either file exists.
pub fn init_ca(dir: &Path) -> Result<CaFiles, Error> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    files::create_dir(dir)?;
    files::ensure_absent(&[&cert_path, &key_path])?;

    let key = KeyPair::generate().map_err(Error::Generate)?;
    // A per-CA tag in the name, so two clusters' CAs never share a subject.
    let tag: String = key.public_key_raw().iter().skip(1).take(4).map(|b| format!("{b:02x}")).collect();
    let common_name = format!("Ferry cluster CA {tag}");
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&common_name, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key).map_err(Error::Generate)?;

    files::write_new(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    if let Err(e) = files::write_new(&cert_path, cert.pem().as_bytes(), CERT_MODE) {
        let _ = std::fs::remove_file(&key_path);
        return Err(e.into());
    }
    Ok(CaFiles { cert: cert_path, key: key_path, common_name })
}

/// Issues a certificate signed by the CA in `ca_dir` and writes `out/cert.pem`,
/// `out/key.pem` (0600) and `out/ca.pem` (`out` created if missing, mode 0700). Refuses,
/// writing nothing, if any of the three exists.
pub fn issue(ca_dir: &Path, request: &IssueRequest, out: &Path) -> Result<IssuedFiles, Error> {
    validate_name(&request.name)?;
    let sans = request.sans.iter().map(|s| parse_san(s)).collect::<Result<Vec<_>, _>>()?;

    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = files::read_text(&ca_cert_path)?;
    let ca_key_pem = files::read_private_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|source| Error::BadCa { path: ca_key_path.clone(), source })?;
    let ca_der = files::read_certs(&ca_cert_path)?.remove(0);
    let ca_params = CertificateParams::from_ca_cert_der(&ca_der)
        .map_err(|source| Error::BadCa { path: ca_cert_path.clone(), source })?;
    if !matches!(ca_params.is_ca, IsCa::Ca(_)) || !public_key_matches(&ca_der, &ca_key) {
        return Err(Error::KeyMismatch { key: ca_key_path, cert: ca_cert_path });
    }
    // Re-signing the CA's own parameters with its key gives an issuer with the stored CA's
    // subject and key identifier; the certificates it signs chain to the stored ca.pem.
    let issuer = ca_params.self_signed(&ca_key).map_err(Error::Generate)?;

    let cert_path = out.join(CERT);
    let key_path = out.join(KEY);
    let ca_copy = out.join(CA_CERT);
    files::create_dir(out)?;
    files::ensure_absent(&[&cert_path, &key_path, &ca_copy])?;

    let key = KeyPair::generate().map_err(Error::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&request.name, Some(request.kind));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match request.kind {
        Kind::Host => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY);
    let cert = params.signed_by(&key, &issuer, &ca_key).map_err(Error::Generate)?;

    let mut written: Vec<&Path> = Vec::new();
    let steps: [(&Path, String, u32); 3] = [
        (&key_path, key.serialize_pem(), KEY_MODE),
        (&cert_path, cert.pem(), CERT_MODE),
        (&ca_copy, ca_pem, CERT_MODE),
    ];
    for (path, contents, mode) in &steps {
        if let Err(e) = files::write_new(path, contents.as_bytes(), *mode) {
            for p in written {
                let _ = std::fs::remove_file(p);
            }
            return Err(e.into());
        }
        written.push(path);
    }
    Ok(IssuedFiles {
        cert: cert_path,
        key: key_path,
        ca: ca_copy,
        name: request.name.clone(),
        kind: request.kind,
        sans: request.sans.clone(),
    })
}

/// The subject alternative names of a host's certificate: its name, `localhost`,
/// 127.0.0.1, ::1, this machine's host name, then `extra` (duplicates dropped).
pub fn host_sans(name: &str, extra: &[String]) -> Vec<String> {
    let mut sans =
        vec![name.to_string(), "localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Some(h) = system_hostname() {
        sans.push(h);
    }
    sans.extend(extra.iter().cloned());
    let mut unique = Vec::new();
    for s in sans {
        if !unique.contains(&s) {
            unique.push(s);
        }
    }
    unique
}

/// Issues a host certificate for `name` with [`host_sans`] (what `ferry host init` does).
pub fn issue_host(ca_dir: &Path, name: &str, addresses: &[String], out: &Path) -> Result<IssuedFiles, Error> {
    let request = IssueRequest { name: name.to_string(), kind: Kind::Host, sans: host_sans(name, addresses) };
    issue(ca_dir, &request, out)
}

/// Issues a client certificate for `name` (what the CLI authenticates with).
pub fn issue_client(ca_dir: &Path, name: &str, out: &Path) -> Result<IssuedFiles, Error> {
    let request = IssueRequest { name: name.to_string(), kind: Kind::Client, sans: Vec::new() };
    issue(ca_dir, &request, out)
}

fn distinguished_name(common_name: &str, kind: Option<Kind>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(kind) = kind {
        dn.push(DnType::OrganizationalUnitName, kind.unit());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    let before = now.checked_sub(BACKDATE).unwrap_or(now);
    params.not_before = time::OffsetDateTime::from(before);
    params.not_after = time::OffsetDateTime::from(now + validity);
}

fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

fn parse_san(s: &str) -> Result<SanType, Error> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_dns = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid_dns {
        return Err(Error::InvalidSan(s.to_string()));
    }
    let name = s.to_string().try_into().map_err(|_| Error::InvalidSan(s.to_string()))?;
    Ok(SanType::DnsName(name))
}

fn public_key_matches(ca_der: &[u8], key: &KeyPair) -> bool {
    match x509_parser::parse_x509_certificate(ca_der) {
        Ok((_, cert)) => cert.public_key().raw == key.public_key_der().as_slice(),
        Err(_) => false,
    }
}

fn system_hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty() && parse_san(h).is_ok()).then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("host-a").is_ok());
        assert!(validate_name("a.b_c").is_ok());
        for bad in ["", "-x", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(matches!(validate_name(bad), Err(Error::InvalidName(_))), "{bad:?}");
        }
    }

    #[test]
    fn sans_are_ip_or_dns() {
        assert!(matches!(parse_san("10.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(parse_san("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(parse_san("host-a.example"), Ok(SanType::DnsName(_))));
        for bad in ["", "a..b", "-a", "a b", "a/b"] {
            assert!(matches!(parse_san(bad), Err(Error::InvalidSan(_))), "{bad:?}");
        }
    }

    #[test]
    fn host_sans_have_loopback_and_no_duplicates() {
        let sans = host_sans("h1", &["127.0.0.1".to_string(), "10.1.2.3".to_string()]);
        assert_eq!(&sans[..4], &["h1", "localhost", "127.0.0.1", "::1"]);
        assert!(sans.contains(&"10.1.2.3".to_string()));
        assert_eq!(sans.iter().filter(|s| *s == "127.0.0.1").count(), 1);
    }
}
