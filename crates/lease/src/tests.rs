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
