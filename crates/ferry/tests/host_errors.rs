//! Bad input to the host daemon: each gives a clear error (naming the file, line and field
//! where there is one) and leaves nothing half-created. Needs /dev/kvm only for the daemon's
//! inventory; no VM runs.

mod common;

use common::hostd::Hostd;
use common::TempDir;

fn stderr_of(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn host_config_errors_name_file_line_and_field() {
    let h = Hostd::config("cfg-ds", "missing = \"/no/such/datastore/dir\"\n");
    let e = stderr_of(&h.serve_to_end());
    let file = h.config.display().to_string();
    assert!(e.contains(&format!("{file}, line 7: datastores.missing:")), "{e}");
    assert!(e.contains("/no/such/datastore/dir does not exist"), "{e}");

    let h = Hostd::config("cfg-pg", "\n[portgroups]\nprod = \"nosuchbr9\"\n");
    let e = stderr_of(&h.serve_to_end());
    assert!(e.contains("line 9: portgroups.prod: bridge \"nosuchbr9\" does not exist on this host"), "{e}");
    assert!(!h.dir.path("state").join("host.db").exists(), "nothing created");

    let h = Hostd::config("cfg-key", "colour = \"red\"\n");
    let e = stderr_of(&h.serve_to_end());
    assert!(e.contains("line 7") && e.contains("colour"), "{e}");
}

#[test]
fn host_vm_bad_input() {
    let mut h = Hostd::config("badvm", "");
    h.start();

    // Unknown VM.
    for action in ["show", "start", "stop", "kill", "log"] {
        let e = h.vm_fails(&[action, "ghost"]);
        assert!(e.contains("no VM named \"ghost\" is registered on this host"), "{action}: {e}");
    }
    // Unknown datastore, bad sizes, unknown port group: nothing created.
    let e = h.vm_fails(&["create", "a", "--datastore", "nope", "--memory-mib", "64", "--guest", "memstress"]);
    assert!(e.contains("no datastore named \"nope\""), "{e}");
    let e = h.vm_fails(&["create", "a", "--datastore", "local", "--memory-mib", "8", "--guest", "memstress"]);
    assert!(e.contains("memory_mib: 8 MiB is too small"), "{e}");
    let e = h.vm_fails(&[
        "create",
        "a",
        "--datastore",
        "local",
        "--memory-mib",
        "64",
        "--guest",
        "memstress",
        "--nic",
        "portgroup=prod",
    ]);
    assert!(e.contains("nics[0].portgroup: this host has no port group \"prod\""), "{e}");
    assert_eq!(
        std::fs::read_dir(h.ds())
            .expect("ds")
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with(".ferry-datastore"))
            .count(),
        0
    );

    // Duplicate name.
    h.create_memstress("a", &[]);
    let e =
        h.vm_fails(&["create", "a", "--datastore", "local", "--memory-mib", "64", "--guest", "memstress"]);
    assert!(e.contains("a VM named \"a\" is already registered"), "{e}");

    // A malformed vm.toml: register names its line and field; nothing is registered.
    let bad = h.home("bad");
    std::fs::create_dir_all(&bad).expect("home");
    std::fs::write(
        bad.join("vm.toml"),
        "name = \"bad\"\nmemory_mib = 64\nvcpus = \"two\"\nguest = \"memstress\"\n",
    )
    .expect("vm.toml");
    let e = h.vm_fails(&["register", bad.to_str().expect("path")]);
    assert!(e.contains(&format!("{}, line 3: vcpus:", bad.join("vm.toml").display())), "{e}");
    std::fs::write(bad.join("vm.toml"), "name = \"bad\"\nmemory_mib = 64\nvcpus = 1\nguest = \"memstress\"\n\n[[nics]]\nmac = \"01:00:00:00:00:01\"\nportgroup = \"x\"\n")
        .expect("vm.toml");
    let e = h.vm_fails(&["register", bad.to_str().expect("path")]);
    assert!(e.contains("line 7: nics[0].mac: 01:00:00:00:00:01 is a multicast address"), "{e}");
    // A directory that does not exist; a home directory that exists but is not registered.
    let e = h.vm_fails(&["register", "/no/such/home"]);
    assert!(e.contains("/no/such/home: No such file or directory"), "{e}");
    std::fs::create_dir_all(h.home("b")).expect("dir");
    let e =
        h.vm_fails(&["create", "b", "--datastore", "local", "--memory-mib", "64", "--guest", "memstress"]);
    assert!(e.contains("exists already"), "{e}");
    std::fs::remove_dir(h.home("b")).expect("rmdir");
    // A home outside the datastores.
    let e = h.vm_fails(&["register", "/tmp"]);
    assert!(e.contains("is not a home directly inside one of this host's datastores"), "{e}");
    let list = h.vm_json(&["list"]);
    assert_eq!(list["vms"].as_array().expect("vms").len(), 1, "{list}");

    // A good home registers; the same home twice is refused.
    std::fs::write(
        bad.join("vm.toml"),
        "name = \"bad\"\nmemory_mib = 64\nvcpus = 1\nguest = \"memstress\"\n",
    )
    .expect("vm.toml");
    assert_eq!(h.vm_json(&["register", bad.to_str().expect("path")])["state"], "defined");
    let e = h.vm_fails(&["register", bad.to_str().expect("path")]);
    assert!(e.contains("already registered"), "{e}");

    // A guest the VMM does not know: the start fails with the VMM's own words, and the VM
    // is left crashed with its exit code (nothing runs, no socket is left).
    h.vm_json(&["create", "g", "--datastore", "local", "--memory-mib", "64", "--guest", "nosuchguest"]);
    let e = h.vm_fails(&["start", "g"]);
    assert!(e.contains("the VMM of g exited while starting (exit code"), "{e}");
    assert!(e.contains("nosuchguest"), "{e}");
    let v = h.vm_json(&["show", "g"]);
    assert_eq!(v["state"], "crashed", "{v}");
    assert!(v.get("api_socket").is_none(), "{v}");
    h.vm_json(&["list"]);

    // A home removed while the daemon was down: at start-up the home wins, the VM is
    // unregistered (and an event says why).
    h.stop_daemon();
    std::fs::remove_dir_all(h.home("a")).expect("remove home");
    h.start();
    let list = h.vm_json(&["list"]);
    let names: Vec<&str> =
        list["vms"].as_array().expect("vms").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["bad", "g"], "{list}");
    assert!(h.daemon_log().contains("unregistered: its home cannot be read"), "{}", h.daemon_log());

    // Unregister: refused for an unknown VM; the home stays and registers again.
    let e = h.vm_fails(&["unregister", "ghost"]);
    assert!(e.contains("no VM named \"ghost\""), "{e}");
    h.vm_json(&["unregister", "bad"]);
    assert!(bad.join("vm.toml").is_file(), "the home stays");
    assert_eq!(h.vm_json(&["register", bad.to_str().expect("path")])["state"], "defined");

    // An unreachable daemon.
    let out = common::ferry()
        .env(ferry_pki::IDENTITY_ENV, &common::hostd::cluster().client)
        .args(["vm", "list", "--host", "https://127.0.0.1:1"])
        .output()
        .expect("run");
    let e = stderr_of(&out);
    assert!(e.contains("cannot reach the host daemon at https://127.0.0.1:1"), "{e}");
}

/// Every TCP port of the daemon speaks mutual TLS: a client with a certificate from another
/// CA, or with none, is refused before any request is read (nothing is created); a plain
/// http:// URL is refused by the CLI itself; a daemon without its identity does not start.
#[test]
fn the_daemon_refuses_clients_without_a_certificate_of_the_cluster_ca() {
    let mut h = Hostd::config("tls", "");
    let out = h.serve_to_end();
    let e = stderr_of(&out);
    assert!(!out.status.success() && e.contains("make it with `ferry host init`"), "{e}");
    h.start();
    let other = TempDir::new("other-ca");
    ferry_pki::init_ca(&other.path("ca")).expect("another CA");
    ferry_pki::issue_client(&other.path("ca"), "intruder", &other.path("client")).expect("its client");
    let out = common::ferry()
        .env(ferry_pki::IDENTITY_ENV, other.path("client"))
        .args(["vm", "create", "x", "--datastore", "local", "--memory-mib", "32", "--guest", "memstress"])
        .args(["--host", &h.url])
        .output()
        .expect("run");
    let e = stderr_of(&out);
    assert!(!out.status.success(), "a client of another CA was served: {e}");
    assert!(!h.home("x").exists(), "a refused request created the VM");
    // No certificate at all (an identity directory without one).
    let out = common::ferry()
        .env(ferry_pki::IDENTITY_ENV, other.path("nothing"))
        .args(["vm", "list", "--host", &h.url])
        .output()
        .expect("run");
    assert!(stderr_of(&out).contains("cannot use the TLS identity"), "{}", stderr_of(&out));
    // Plain HTTP is not spoken.
    let plain = h.url.replace("https://", "http://");
    let out = common::ferry()
        .env(ferry_pki::IDENTITY_ENV, &common::hostd::cluster().client)
        .args(["vm", "list", "--host", &plain])
        .output()
        .expect("run");
    assert!(stderr_of(&out).contains("speaks only HTTPS"), "{}", stderr_of(&out));
    // The test's own identity works.
    assert!(h.vm(&["list"]).status.success());
}
