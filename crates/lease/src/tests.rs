//! Tests against a real sanlock daemon (root, the `sanlock` package): they fail, not skip,
//! without it.

use super::*;
use crate::testing::{zero_file, Daemon, Scratch};

const MIB: u64 = 1 << 20;

#[test]
fn lockspace_lease_inquire_release_and_owners() {
    let dir = Scratch::new("lease-unit").expect("scratch");
    let scratch = dir.path();
    let daemon = Daemon::start(scratch, "unit-a", &[]).expect("start sanlock");
    daemon.use_in_this_process();

    let ids = scratch.join("ids");
    zero_file(&ids, MIB).expect("ids");
    let ls = Lockspace::new("FERRYUNIT", 1, &ids).expect("lockspace");
    ls.format(1).expect("format the lockspace");
    assert!(!ls.is_joined().expect("inq"));
    let t = std::time::Instant::now();
    ls.add(1).expect("add_lockspace");
    eprintln!("add_lockspace took {:?}", t.elapsed());
    assert!(ls.is_joined().expect("inq"));
    ls.add(1).expect("adding twice is fine");

    // The daemon answers EAGAIN until it has watched the lockspace's hosts for a while.
    let t = std::time::Instant::now();
    let me = loop {
        match ls.host(1) {
            Err(e) if e.errno() == Some(libc::EAGAIN) && t.elapsed().as_secs() < 30 => {
                std::thread::sleep(std::time::Duration::from_millis(200))
            }
            other => break other.expect("get_hosts").expect("our host"),
        }
    };
    eprintln!("get_hosts answered {:?} after add_lockspace", t.elapsed());
    let age = monotonic_secs().saturating_sub(me.timestamp);
    // Fresh: well below the 8 * io_timeout at which sanlock counts it failed.
    assert!(age < 8, "our delta lease is {age} s old: {me:?}");
    assert_eq!(me.io_timeout, 1);

    let path = scratch.join("vm.lease");
    zero_file(&path, MIB).expect("lease file");
    let name = new_resource_name();
    let res = Resource::new("FERRYUNIT", &name, &path).expect("resource");
    res.format().expect("format the lease");
    assert_eq!(Resource::read(&path).expect("read back"), res);
    assert_eq!(res.owners().expect("owners").hosts, vec![]);

    let mut lease = Lease::acquire(&res, None).expect("acquire");
    assert_eq!(lease.lver(), 1);
    let owners = res.owners().expect("owners");
    assert_eq!(owners.lver, 1);
    assert_eq!(owners.hosts.iter().map(|h| h.host_id).collect::<Vec<_>>(), vec![1]);
    // Another registration of this host cannot take it while it is held.
    let e = Lease::acquire(&res, None).expect_err("held");
    assert!(e.code().is_some() || e.errno().is_some(), "{e}");
    lease.release().expect("release");
    drop(lease);
    // The version goes up with every acquisition; a killpath is accepted.
    let kp = KillPath { program: "/bin/true".into(), args: "x".into() };
    let again = Lease::acquire(&res, Some(&kp)).expect("acquire again");
    assert_eq!(again.lver(), 2);
    drop(again);

    // A lease in a lockspace this host has not joined.
    let other = Resource::new("NOTJOINED", &name, &path).expect("resource");
    let e = Lease::acquire(&other, None).expect_err("not joined");
    assert!(e.code().is_some() || e.errno().is_some(), "{e}");

    ls.rem().expect("rem_lockspace");
    assert!(!ls.is_joined().expect("inq"));
    drop(daemon);
}

#[test]
fn names_and_paths_are_checked() {
    assert!(matches!(Lockspace::new("a:b", 1, Path::new("/x")), Err(Error::Invalid { .. })));
    assert!(matches!(Lockspace::new(&"n".repeat(48), 1, Path::new("/x")), Err(Error::Invalid { .. })));
    assert!(Lockspace::new(&"n".repeat(47), 1, Path::new("/x")).is_ok());
    assert!(matches!(Resource::new("ls", "", Path::new("/x")), Err(Error::Invalid { .. })));
    let long = PathBuf::from(format!("/{}", "p".repeat(1100)));
    assert!(matches!(Resource::new("ls", "r", &long), Err(Error::Invalid { .. })));
}

#[test]
fn inquire_state_strings() {
    assert_eq!(parse_lver("LS:vm1:/d/leases:0:6", "vm1"), Some(6));
    assert_eq!(parse_lver("LS:a:/p:0:2 LS:b:/q\\:x:1048576:9", "b"), Some(9));
    assert_eq!(parse_lver("LS:a:/p:0:2", "b"), None);
    assert_eq!(parse_lver("", "b"), None);
}

#[test]
fn a_ballot_block_marked_released_frees_the_leader_that_still_names_its_host() {
    let dir = Scratch::new("lease-dblock").expect("scratch");
    let path = dir.path().join("vm.lease");
    // A leader naming host 2 at lease version 3 (512-byte sectors), and host 2's ballot
    // block, as sanlock leaves them when another host committed the leader for host 2.
    let mut area = vec![0u8; MIB as usize];
    area[0..4].copy_from_slice(&0x0615_2010u32.to_le_bytes());
    area[12..16].copy_from_slice(&512u32.to_le_bytes());
    let dblock = 512 * (2 + 2 - 1);
    area[dblock + 40..dblock + 48].copy_from_slice(&3u64.to_le_bytes());
    area[dblock + 52..dblock + 56].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&path, &area).expect("write");
    let r = Resource { lockspace: "LS".into(), name: "vm".into(), path: path.clone(), offset: 0 };
    assert!(r.released_by(2, 3).expect("read"));
    // Another version, another host: not released.
    assert!(!r.released_by(2, 4).expect("read"));
    assert!(!r.released_by(1, 3).expect("read"));
    // Not a lease at all.
    std::fs::write(&path, vec![0u8; 4096]).expect("write");
    assert_eq!(r.released_by(2, 3).expect_err("no magic").code(), Some(Code::LeaderMagic));
}
