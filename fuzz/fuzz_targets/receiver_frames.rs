//! Feeds arbitrary bytes through what a migration receiver does with its input: frames one
//! after another until an error; page batches decoded into runs (every address page-aligned,
//! every run's data a whole number of pages, the runs adding up to the count); control messages parsed as JSON and as the typed messages.
//! Anything but an `Err` on bad input (a panic, an abort, a hang) is a bug.
#![no_main]

use ferry_migration::protocol::{self as wire, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut payload = Vec::new();
    while let Ok(kind) = wire::read_frame_into(&mut r, &mut payload) {
        assert!(payload.len() <= kind.max_payload() as usize);
        match kind {
            Kind::Pages => {
                let mut pages = 0u64;
                let r = wire::decode_page_runs(&payload, |run| {
                    match run {
                        wire::PageRun::Zero(addr) => assert_eq!(addr % wire::PAGE_SIZE as u64, 0),
                        wire::PageRun::Data { addr, data } => {
                            assert_eq!(addr % wire::PAGE_SIZE as u64, 0);
                            assert!(!data.is_empty() && data.len() % wire::PAGE_SIZE == 0);
                        }
                    }
                    pages += run.pages();
                    Ok(())
                });
                if let Ok(n) = r {
                    assert_eq!(n as u64, pages);
                }
            }
            _ => {
                let _ = wire::parse_json::<serde_json::Value>(kind, &payload, kind, "any");
                let _ = wire::parse_json::<wire::Hello>(kind, &payload, Kind::Hello, "Hello");
                let _ = wire::parse_json::<wire::Challenge>(kind, &payload, Kind::Challenge, "Challenge");
                let _ = wire::parse_json::<wire::PassEnd>(kind, &payload, Kind::PassEnd, "PassEnd");
                let _ = wire::parse_json::<wire::Verify>(kind, &payload, Kind::Verify, "Verify");
                let _ = wire::parse_json::<wire::RestoreResult>(kind, &payload, Kind::RestoreResult, "RR");
            }
        }
    }
});
