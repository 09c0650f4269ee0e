//! Feeds arbitrary bytes through what a migration receiver does with its input: frame
//! headers one after another until an error; for a page batch, its count and entries read
//! and checked first, then each run's data read off the stream (every address page-aligned,
//! the runs adding up to the count and their data to the announced length), and the same
//! batch decoded whole; control messages parsed as JSON and as the typed messages.
//! Anything but an `Err` on bad input (a panic, an abort, a hang) is a bug.
#![no_main]

use std::io::Read;

use ferry_migration::protocol::{self as wire, Kind, PageEntries, Run};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut payload = Vec::new();
    let mut entries = PageEntries::default();
    let mut scratch = vec![0u8; 512 * wire::PAGE_SIZE];
    while let Ok(h) = wire::read_header(&mut r) {
        assert!(h.len <= h.kind.max_payload());
        if h.kind == Kind::Pages {
            // As the receiver does it: entries, then the data of each run from the stream.
            let whole = r.get(..h.len as usize).map(<[u8]>::to_vec);
            if h.read_page_entries(&mut r, &mut entries).is_err() {
                break;
            }
            let (mut pages, mut data_bytes) = (0usize, 0usize);
            for run in entries.runs() {
                match run {
                    Run::Zero(addr) => {
                        assert_eq!(addr % wire::PAGE_SIZE as u64, 0);
                        pages += 1;
                    }
                    Run::Data { addr, pages: n } => {
                        assert_eq!(addr % wire::PAGE_SIZE as u64, 0);
                        assert!(n > 0);
                        pages += n;
                        data_bytes += n * wire::PAGE_SIZE;
                    }
                }
            }
            assert_eq!(pages, entries.len());
            assert_eq!(data_bytes, entries.data_len());
            if r.read_exact(&mut scratch[..data_bytes]).is_err() {
                break;
            }
            // The whole-payload decoder agrees.
            if let Some(whole) = whole {
                let n = wire::decode_page_runs(&whole, |_| Ok(())).expect("the streamed batch decodes whole");
                assert_eq!(n, entries.len());
            }
            continue;
        }
        if h.read_payload(&mut r, &mut payload).is_err() {
            break;
        }
        let kind = h.kind;
        let _ = wire::parse_json::<serde_json::Value>(kind, &payload, kind, "any");
        let _ = wire::parse_json::<wire::Hello>(kind, &payload, Kind::Hello, "Hello");
        let _ = wire::parse_json::<wire::Challenge>(kind, &payload, Kind::Challenge, "Challenge");
        let _ = wire::parse_json::<wire::PassEnd>(kind, &payload, Kind::PassEnd, "PassEnd");
        let _ = wire::parse_json::<wire::PassAck>(kind, &payload, Kind::PassAck, "PassAck");
        let _ = wire::parse_json::<wire::Verify>(kind, &payload, Kind::Verify, "Verify");
        let _ = wire::parse_json::<wire::RestoreResult>(kind, &payload, Kind::RestoreResult, "RR");
    }
});
