//! Feeds arbitrary bytes, as a peer would send them, through the receiver's handshake
//! (`ferry_migration::handshake`, the code `ferry receive` runs before a connection is
//! authenticated): the Hello, its checks, the Challenge, the ChallengeResponse and its
//! proof. Each input is tried twice: as the whole conversation, and as what follows a
//! valid Hello (so that the fuzzer reaches the ChallengeResponse with its own bytes).
//! Whatever comes in, the receiver must fail with an `Err` (never panic or hang), never
//! hold more than a handshake frame, and never accept a proof it did not check.
#![no_main]

use ferry_migration::auth::{self, Key, NONCE_LEN};
use ferry_migration::handshake::{self, MemoryPeer};
use ferry_migration::protocol::{self as wire, Kind, HANDSHAKE_MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fn run(input: &[u8], key: &Key) {
    let mut w = MemoryPeer { input, output: Vec::new() };
    let mut payload = Vec::new();
    let result = (|| {
        let hello = handshake::read_hello(&mut w, &mut payload)?;
        assert!(handshake::valid_id(&hello.migration_id));
        handshake::check_hello(&hello)?;
        handshake::challenge(&mut w, key, &hello, &[5u8; NONCE_LEN], &mut payload)
    })();
    // No frame over the handshake bound was read (the buffer may round up once).
    assert!(payload.len() <= HANDSHAKE_MAX_PAYLOAD as usize);
    assert!(payload.capacity() <= 2 * HANDSHAKE_MAX_PAYLOAD as usize);
    // A random input cannot carry the HMAC of a nonce it never saw.
    assert!(result.is_err(), "a fuzzed peer authenticated");
}

fuzz_target!(|data: &[u8]| {
    let key = match Key::from_bytes(vec![0x42; 32]) {
        Ok(k) => k,
        Err(_) => return,
    };
    run(data, &key);
    let hello = wire::Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        migration_id: "m-fuzz".into(),
        ferry_version: "fuzz".into(),
        nonce: auth::hex(&[7u8; NONCE_LEN]),
        stream: data.first().map_or(0, |b| u32::from(b & 3)),
        ..Default::default()
    };
    let mut conversation = Vec::new();
    if wire::write_frame(&mut conversation, Kind::Hello, &wire::to_json(&hello)).is_ok() {
        conversation.extend_from_slice(data);
        run(&conversation, &key);
    }
});
