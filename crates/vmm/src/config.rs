//! What a VM is made of, as the user describes it.

use std::path::PathBuf;
use std::str::FromStr;

/// Errors in a VM description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A size could not be parsed.
    #[error("cannot parse size {0:?}: use a number with an optional K, M, G or T suffix (powers of 1024), e.g. 256M or 2G")]
    BadSize(String),
    /// No vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs requested; at most {max} are possible here (this host's KVM limit, and 255 for xAPIC IDs)")]
    TooManyVcpus {
        /// Requested.
        requested: u32,
        /// KVM's limit.
        max: usize,
    },
    /// A serial destination could not be parsed.
    #[error("cannot parse serial destination {0:?}: use stdio, null or file:PATH")]
    BadSerial(String),
}

/// Parses a size like `256M`, `2G`, `2GiB`, `1048576` or `512K` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let bad = || Error::BadSize(s.to_string());
    let upper = s.trim().to_ascii_uppercase();
    let t = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix("I"))
        .or_else(|| upper.strip_suffix("B"))
        .unwrap_or(&upper);
    let (digits, shift) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// An ELF file on the host.
    File(PathBuf),
    /// An ELF image built into Ferry (the bundled test guests).
    Embedded {
        /// Its name.
        name: String,
        /// The image.
        elf: &'static [u8],
    },
}

impl KernelSource {
    /// A name for messages.
    pub fn name(&self) -> String {
        match self {
            KernelSource::File(p) => format!("kernel {}", p.display()),
            KernelSource::Embedded { name, .. } => format!("guest {name}"),
        }
    }
}

/// Where the serial console goes. Only [`SerialConfig::Stdio`] lets the VMM use the
/// process's standard input and output: the `ferry` binary's choice (`--serial stdio`, its
/// default) to give them to the VM; a program embedding the library keeps them with
/// `File` or `Null` (the default).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// The process's standard output, and input forwarded from its standard input.
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    #[default]
    Null,
}

impl FromStr for SerialConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "null" => Ok(SerialConfig::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
                _ => Err(Error::BadSerial(s.to_string())),
            },
        }
    }
}

/// A VM to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The kernel.
    pub kernel: KernelSource,
    /// Its command line.
    pub cmdline: String,
    /// An initrd, loaded by the host and handed to the guest as PVH module 0.
    pub initrd: Option<PathBuf>,
    /// The serial console.
    pub serial: SerialConfig,
    /// `CLOCK_MONOTONIC` nanoseconds at which the process started, for the boot timer.
    pub started_ns: u64,
    /// Serve the API on this unix socket.
    pub api_socket: Option<PathBuf>,
    /// The VM's home directory (its lock); `None` makes one under `state_dir`.
    pub home: Option<PathBuf>,
    /// Where default homes go (`<state_dir>/vms/<id>`).
    pub state_dir: PathBuf,
    /// The VM's lease on shared storage (`None`: `vm.lock` alone arbitrates).
    pub lease: Option<crate::lease::LeaseConfig>,
    /// Disk images, one virtio-blk device each, in order.
    pub disks: Vec<crate::disk::DiskConfig>,
    /// NICs on tap devices, one virtio-net device each, after the disks.
    pub nets: Vec<ferry_net::NetConfig>,
    /// CPU features hidden from the guest's CPUID (`--cpu-hide`; names as
    /// [`ferry_arch::cpuid::feature_names`]), so that it can later move to hosts without them.
    pub cpu_hide: Vec<String>,
}

impl VmConfig {
    /// Checks what can be checked without touching the host, given KVM's vCPU limit.
    pub fn validate(&self, max_vcpus: usize) -> Result<(), Error> {
        if self.vcpus == 0 {
            return Err(Error::NoVcpus);
        }
        if self.vcpus as usize > max_vcpus {
            return Err(Error::TooManyVcpus { requested: self.vcpus, max: max_vcpus });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("1.5G").is_err());
    }

    #[test]
    fn serial_destinations() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("null".parse(), Ok(SerialConfig::Null));
        assert_eq!("file:/tmp/x".parse(), Ok(SerialConfig::File("/tmp/x".into())));
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp:1".parse::<SerialConfig>().is_err());
    }
}
