//! A small network of namespaces for Ferry's end-to-end network tests and benchmarks
//! (needs root and iproute2):
//!
//! ```text
//!   client ns            switch ns (br0, the "physical switch")           host A ns / host B ns
//!   c0 10.77.0.100 ── sw-c │ br0 │ sw-a ── uplink (in brA 10.77.0.11) ── tap vm0 (the VM's NIC)
//!                          │     │ sw-b ── uplink (in brB 10.77.0.12) ── tap vm0
//! ```
//!
//! Each host has its own bridge joining its uplink and a tap called `vm0`, as a hypervisor
//! host does; the VM's MAC is learned on whichever switch port leads to the host running
//! it. Everything is removed at drop (deleting a namespace deletes what is inside).

use std::process::{Command, Stdio};

/// The VM's address in tests.
pub const VM_IP: &str = "10.77.0.2";
/// Host A's address (migration traffic goes host to host over the same switch).
pub const HOST_A_IP: &str = "10.77.0.11";
/// Host B's address.
pub const HOST_B_IP: &str = "10.77.0.12";
/// The client's address.
pub const CLIENT_IP: &str = "10.77.0.100";
/// The tap on each host.
pub const TAP: &str = "vm0";

/// The namespaces; removed at drop.
#[derive(Debug)]
pub struct Net {
    /// The switch's namespace (bridge `br0`).
    pub switch: String,
    /// Host A's namespace.
    pub a: String,
    /// Host B's namespace.
    pub b: String,
    /// The client's namespace.
    pub client: String,
}

fn ip(ns: &str, args: &str) -> Result<(), String> {
    let mut v = vec!["-n", ns];
    v.extend(args.split_whitespace());
    let out = Command::new("ip")
        .args(&v)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", v.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// Builds the network; `tag` keeps names apart between tests and runs.
    pub fn new(tag: &str) -> Result<Self, String> {
        let id = format!("{tag}{}", std::process::id() % 10_000);
        let n = Net {
            switch: format!("fysw{id}"),
            a: format!("fya{id}"),
            b: format!("fyb{id}"),
            client: format!("fyc{id}"),
        };
        for ns in [&n.switch, &n.a, &n.b, &n.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            let added = Command::new("ip").args(["netns", "add", ns]).stderr(Stdio::null()).status();
            if !added.is_ok_and(|s| s.success()) {
                return Err(format!("cannot create network namespace {ns} (root and iproute2 needed)"));
            }
            ip(ns, "link set lo up")?;
        }
        ip(&n.switch, "link add br0 type bridge")?;
        ip(&n.switch, "link set br0 up")?;
        for (host, port, addr, br) in [(&n.a, "sw-a", HOST_A_IP, "brA"), (&n.b, "sw-b", HOST_B_IP, "brB")] {
            ip(&n.switch, &format!("link add {port} type veth peer name uplink netns {host}"))?;
            ip(&n.switch, &format!("link set {port} master br0 up"))?;
            ip(host, &format!("link add {br} type bridge"))?;
            ip(host, &format!("link set uplink master {br} up"))?;
            ip(host, &format!("tuntap add {TAP} mode tap"))?;
            ip(host, &format!("link set {TAP} master {br} up"))?;
            ip(host, &format!("addr add {addr}/24 dev {br}"))?;
            ip(host, &format!("link set {br} up"))?;
        }
        ip(&n.switch, &format!("link add sw-c type veth peer name c0 netns {}", n.client))?;
        ip(&n.switch, "link set sw-c master br0 up")?;
        ip(&n.client, &format!("addr add {CLIENT_IP}/24 dev c0"))?;
        ip(&n.client, "link set c0 up")?;
        Ok(n)
    }

    /// A command run inside namespace `ns`.
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// The switch port on which br0 has learned `mac`, if any.
    pub fn switch_port_of(&self, mac: &str) -> Option<String> {
        let out =
            Command::new("bridge").args(["-n", &self.switch, "fdb", "show", "br", "br0"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(mac) && !l.contains("permanent"))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client, &self.a, &self.b, &self.switch] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}
