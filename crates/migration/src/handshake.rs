//! The receiver's side of the handshake that opens every migration connection, before
//! the peer is authenticated:
//!
//! ```text
//! source                                   receiver
//!   Hello {version, id, nonce_s, stream} ─>  read_hello: a handshake frame (≤ 4 KiB),
//!                                            a well-formed id; check_hello: version, stream
//!   <─ Challenge {nonce_r, proof_r}          challenge: proof_r = HMAC(key, receiver, id#k, nonce_s)
//!   ChallengeResponse {proof_s} ─────────>   proof_s must be HMAC(key, sender, id#k, nonce_r)
//! ```
//!
//! Nothing here reads more than [`HANDSHAKE_MAX_PAYLOAD`](crate::protocol::HANDSHAKE_MAX_PAYLOAD) bytes of a frame or waits on a
//! clock: the caller's reader and writer carry the deadline. No VM is needed, so the
//! fuzzer drives exactly this code.

use std::io::{Read, Write};

use crate::auth::{self, Key, Role, NONCE_LEN};
use crate::outcome::ReasonCode;
use crate::protocol::{
    self, accept_features, parse_json, read_handshake_frame, stream_id, to_json, write_frame, Challenge,
    ChallengeResponse, Hello, Kind, StreamRole, PROTOCOL_VERSION,
};

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed, or a frame was malformed, too large or not a handshake's.
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    /// The Hello names no usable migration id.
    #[error("the migration id must be 1-64 letters, digits, '-' or '_'")]
    BadId,
    /// The peers speak different protocol versions.
    #[error("the peer speaks migration protocol version {0}; this Ferry speaks version {1}")]
    Version(u32, u32),
    /// The Hello carries no nonce to prove the key over.
    #[error("authentication failed: the source sent no valid nonce")]
    BadNonce,
    /// The source's proof is wrong: it does not know the key.
    #[error("authentication failed: the source does not know the migration key")]
    BadProof,
    /// The connection wants to carry something this Ferry does not know.
    #[error("the connection names a stream role this Ferry does not know (a newer source?)")]
    Role,
}

impl Error {
    /// How this ends the connection's migration.
    pub fn code(&self) -> ReasonCode {
        match self {
            Error::Protocol(e) => e.code(),
            Error::BadId => ReasonCode::ProtocolError,
            Error::Version(..) => ReasonCode::VersionMismatch,
            Error::BadNonce | Error::BadProof => ReasonCode::AuthFailed,
            Error::Role => ReasonCode::ProtocolError,
        }
    }
}

/// Whether `id` can name a migration (it appears in logs and lock files).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Reads the first frame of a connection, which must be a Hello naming a well-formed
/// migration id. `payload` is scratch space (it never grows past a handshake frame).
pub fn read_hello<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<Hello, Error> {
    let got = read_handshake_frame(r, payload)?;
    let hello: Hello = parse_json(got, payload, Kind::Hello, "Hello")?;
    if !valid_id(&hello.migration_id) {
        return Err(Error::BadId);
    }
    Ok(hello)
}

/// The checks of a Hello that need no key: protocol version and nonce. (Whether its
/// stream is one the receiver waits for is the receiver's business.)
pub fn check_hello(hello: &Hello) -> Result<(), Error> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Error::Version(hello.protocol_version, PROTOCOL_VERSION));
    }
    if hello.role != StreamRole::Pages {
        return Err(Error::Role);
    }
    match auth::unhex(&hello.nonce) {
        Some(n) if n.len() == NONCE_LEN => Ok(()),
        _ => Err(Error::BadNonce),
    }
}

/// Answers a checked Hello: the Challenge (this side's proof of `key` over the sender's
/// nonce, and `my_nonce`), then the sender's ChallengeResponse, whose proof over
/// `my_nonce` must check. Both proofs are bound to the stream's identity, so that no
/// stream's proof can be replayed as another's.
pub fn challenge<S: Read + Write>(
    s: &mut S,
    key: &Key,
    hello: &Hello,
    my_nonce: &[u8; NONCE_LEN],
    payload: &mut Vec<u8>,
) -> Result<(), Error> {
    let name = stream_id(&hello.migration_id, hello.stream);
    let their_nonce = auth::unhex(&hello.nonce).filter(|n| n.len() == NONCE_LEN).ok_or(Error::BadNonce)?;
    let c = Challenge {
        nonce: auth::hex(my_nonce),
        proof: key.prove(Role::Receiver, &name, &their_nonce),
        features: accept_features(&hello.features),
    };
    write_frame(s, Kind::Challenge, &to_json(&c))?;
    let got = read_handshake_frame(s, payload)?;
    let response: ChallengeResponse = parse_json(got, payload, Kind::ChallengeResponse, "ChallengeResponse")?;
    if !key.check(Role::Sender, &name, my_nonce, &response.proof) {
        return Err(Error::BadProof);
    }
    Ok(())
}

/// A connection in memory, as the receiver sees it: what the peer sent (`input`) and what
/// the receiver wrote back (`output`). For tests and the fuzz target, which drive the
/// handshake without a socket.
#[derive(Debug)]
pub struct MemoryPeer<'a> {
    /// The bytes the peer sent, consumed as they are read.
    pub input: &'a [u8],
    /// What the receiver wrote.
    pub output: Vec<u8>,
}

impl Read for MemoryPeer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemoryPeer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str, stream: u32) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            migration_id: id.into(),
            ferry_version: "test".into(),
            nonce: auth::hex(&[7u8; NONCE_LEN]),
            stream,
            ..Default::default()
        }
    }

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, payload).expect("frame");
        v
    }

    #[test]
    fn an_unknown_role_is_refused_and_features_are_answered() {
        let mut h = hello("m-1", 0);
        h.role = StreamRole::Unknown;
        assert!(matches!(check_hello(&h), Err(Error::Role)));
        assert_eq!(Error::Role.code(), ReasonCode::ProtocolError);
        // The Challenge carries the features the receiver accepts.
        let key = Key::from_bytes(vec![9; 32]).expect("key");
        let mut h = hello("m-1", 0);
        h.features = vec!["generation".into(), "teleport".into()];
        let mut p = MemoryPeer { input: &[], output: Vec::new() };
        let mut payload = Vec::new();
        // No ChallengeResponse follows: the Challenge is written, then the read fails.
        assert!(challenge(&mut p, &key, &h, &[1; NONCE_LEN], &mut payload).is_err());
        let mut out = &p.output[..];
        let frame = protocol::read_frame(&mut out).expect("the Challenge");
        let c: Challenge = frame.json(Kind::Challenge, "Challenge").expect("JSON");
        assert_eq!(c.features, vec!["generation".to_string()]);
    }

    #[test]
    fn a_source_that_knows_the_key_gets_through() {
        let key = Key::from_bytes(vec![9; 32]).expect("key");
        let mine = [5u8; NONCE_LEN];
        for k in [0, 3] {
            let h = hello("m-1", k);
            let name = stream_id("m-1", k);
            let proof = key.prove(Role::Sender, &name, &mine);
            let mut input = frame(Kind::Hello, &to_json(&h));
            input.extend(frame(Kind::ChallengeResponse, &to_json(&ChallengeResponse { proof })));
            let mut w = MemoryPeer { input: &input, output: Vec::new() };
            let mut payload = Vec::new();
            let got = read_hello(&mut w, &mut payload).expect("hello");
            check_hello(&got).expect("checks");
            challenge(&mut w, &key, &got, &mine, &mut payload).expect("authenticated");
            let c: Challenge = protocol::read_frame(&mut &w.output[..])
                .expect("frame")
                .json(Kind::Challenge, "C")
                .expect("C");
            assert!(key.check(Role::Receiver, &name, &[7u8; NONCE_LEN], &c.proof));
        }
    }

    #[test]
    fn bad_hellos_and_wrong_proofs_fail() {
        let key = Key::from_bytes(vec![9; 32]).expect("key");
        let mut payload = Vec::new();
        let mut bad_id = hello("m 1", 0);
        let r = read_hello(&mut &frame(Kind::Hello, &to_json(&bad_id))[..], &mut payload);
        assert!(matches!(r, Err(Error::BadId)), "{r:?}");
        bad_id.migration_id = "x".repeat(65);
        assert!(read_hello(&mut &frame(Kind::Hello, &to_json(&bad_id))[..], &mut payload).is_err());
        let mut h = hello("m-1", 0);
        h.protocol_version = 1;
        assert!(matches!(check_hello(&h), Err(Error::Version(1, PROTOCOL_VERSION))));
        let mut h = hello("m-1", 0);
        h.nonce = "abc".into();
        assert!(matches!(check_hello(&h), Err(Error::BadNonce)));
        // A proof made with another key, or over another stream's identity.
        for (k, name) in [(Key::from_bytes(vec![8; 32]).expect("key"), "m-1"), (key.clone(), "m-1#1")] {
            let proof = k.prove(Role::Sender, name, &[5u8; NONCE_LEN]);
            let input = frame(Kind::ChallengeResponse, &to_json(&ChallengeResponse { proof }));
            let mut w = MemoryPeer { input: &input, output: Vec::new() };
            let r = challenge(&mut w, &key, &hello("m-1", 0), &[5u8; NONCE_LEN], &mut payload);
            assert!(matches!(r, Err(Error::BadProof)), "{r:?}");
        }
        // Config where the response belongs: refused from its header.
        let input = frame(Kind::Config, b"{}");
        let mut w = MemoryPeer { input: &input, output: Vec::new() };
        let r = challenge(&mut w, &key, &hello("m-1", 0), &[5u8; NONCE_LEN], &mut payload);
        assert!(matches!(r, Err(Error::Protocol(protocol::Error::Unexpected { got: Kind::Config, .. }))));
    }
}
