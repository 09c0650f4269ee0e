//! Feeds arbitrary bytes through what a destination does with a `DeltaPages` payload
//! (`ferry_migration::delta`): the frame's entries are parsed and checked, and each delta
//! is applied to a page, each compressed page decompressed. Whatever comes in, parsing and applying must fail with an `Err`
//! (never panic), a delta that is refused must leave its page untouched, and one that is
//! accepted must write inside the page only.
#![no_main]

use ferry_migration::delta::{self, Entry};
use ferry_migration::protocol::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // As a whole frame.
    if let Ok(entries) = delta::parse(input) {
        for e in entries {
            let mut page = [0x5au8; PAGE_SIZE];
            match e {
                Entry::Delta { delta, .. } => delta::apply(&mut page, delta).expect("a delta that parsed applies"),
                Entry::Lz4(_, packed) => {
                    let _ = delta::decompress(packed, &mut page);
                }
                Entry::Zero(_) | Entry::Full(..) => {}
            }
        }
    }
    // As one delta.
    let mut page = [0xa5u8; PAGE_SIZE];
    if delta::apply(&mut page, input).is_err() {
        assert!(page.iter().all(|&b| b == 0xa5), "a refused delta changed its page");
    }
});
