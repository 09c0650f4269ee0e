//! MAC addresses and the `--net` option.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors parsing a MAC address or a `--net` option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not six hex octets separated by colons.
    #[error("{0:?} is not a MAC address (expected six hex octets like 52:54:00:12:34:56)")]
    BadMac(String),
    /// Bit 0 of the first octet set: frames to it would go to a group.
    #[error("MAC {0} is a multicast address; a NIC needs a unicast one (first octet even)")]
    Multicast(MacAddr),
    /// All zeros.
    #[error("MAC 00:00:00:00:00:00 is not a usable address")]
    Zero,
    /// The option's text is malformed.
    #[error("--net {text:?}: {why} (expected tap=NAME,mac=MAC)")]
    Parse {
        /// The option's text.
        text: String,
        /// What is wrong.
        why: String,
    },
}

/// A unicast Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = MacAddr(out);
        if out == [0; 6] {
            return Err(Error::Zero);
        }
        if out[0] & 1 != 0 {
            return Err(Error::Multicast(mac));
        }
        Ok(mac)
    }
}

/// One `--net` option: a VM NIC backed by an existing tap device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The tap device's name.
    pub tap: String,
    /// The NIC's MAC address (it moves with the VM).
    pub mac: MacAddr,
}

impl FromStr for NetConfig {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Parse { text: text.to_owned(), why };
        let (mut tap, mut mac) = (None, None);
        for part in text.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
            match k {
                "tap" if tap.is_some() => return Err(bad("tap given twice".into())),
                "tap" => tap = Some(v.to_owned()),
                "mac" if mac.is_some() => return Err(bad("mac given twice".into())),
                "mac" => mac = Some(v.parse::<MacAddr>().map_err(|e| bad(e.to_string()))?),
                _ => return Err(bad(format!("unknown key {k:?}"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("no tap=NAME".into()))?;
        crate::tap::check_name(&tap).map_err(|e| bad(e.to_string()))?;
        let mac = mac.ok_or_else(|| bad("no mac=MAC".into()))?;
        Ok(Self { tap, mac })
    }
}

/// Checks a VM's NICs together: no MAC and no tap twice.
pub fn check_nics(nics: &[NetConfig]) -> Result<(), String> {
    for (i, a) in nics.iter().enumerate() {
        for b in &nics[i + 1..] {
            if a.mac == b.mac {
                return Err(format!("MAC {} is given to two NICs of this VM", a.mac));
            }
            if a.tap == b.tap {
                return Err(format!("tap device {} is given to two NICs of this VM", a.tap));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().expect("mac");
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52-54-00-ab-cd-01",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(Error::BadMac(bad.into())), "{bad}");
        }
        assert!(matches!("01:00:5e:00:00:01".parse::<MacAddr>(), Err(Error::Multicast(_))));
        assert_eq!("00:00:00:00:00:00".parse::<MacAddr>(), Err(Error::Zero));
    }

    #[test]
    fn net_options() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:00:00:01".parse().expect("net");
        assert_eq!(n.tap, "tap0");
        for bad in [
            "tap=tap0",
            "mac=52:54:00:00:00:01",
            "tap=tap0,mac=52:54:00:00:00",
            "tap=,mac=52:54:00:00:00:01",
            "tap=a/b,mac=52:54:00:00:00:01",
            "tap=averyveryverylongname,mac=52:54:00:00:00:01",
            "tap=t,tap=u,mac=52:54:00:00:00:01",
            "tap=t,mac=52:54:00:00:00:01,queues=2",
            "tap0",
        ] {
            let e = bad.parse::<NetConfig>().expect_err(bad);
            assert!(e.to_string().contains("expected tap=NAME,mac=MAC"), "{e}");
        }
        let a: NetConfig = "tap=a,mac=52:54:00:00:00:01".parse().expect("a");
        let b: NetConfig = "tap=b,mac=52:54:00:00:00:01".parse().expect("b");
        let c: NetConfig = "tap=a,mac=52:54:00:00:00:02".parse().expect("c");
        assert!(check_nics(&[a.clone(), b]).expect_err("dup mac").contains("two NICs"));
        assert!(check_nics(&[a.clone(), c.clone()]).expect_err("dup tap").contains("tap device a"));
        let d: NetConfig = "tap=d,mac=52:54:00:00:00:03".parse().expect("d");
        assert!(check_nics(&[a, d]).is_ok());
    }
}
