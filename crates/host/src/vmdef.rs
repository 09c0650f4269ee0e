//! A VM's definition, `vm.toml` in its home (`DATASTORE/NAME/`), and making a home.
//!
//! The fields are [`ferry_host_api::VmDefinition`]'s. Errors name the file, the line and the
//! field, for syntax and type errors (from the `toml` crate's spans) as for the checks
//! made after parsing.

use std::path::{Path, PathBuf};

use ferry_host_api::{NicDef, VmDefinition};

/// The definition's file name in a home.
pub const DEFINITION_FILE: &str = "vm.toml";
/// Names a disk file may not take: the home's own files.
const RESERVED: &[&str] = &[
    DEFINITION_FILE,
    "vm.lock",
    "vm.generation",
    "runs.log",
    "vm.log",
    "vm.lease",
    "console.log",
    "logs",
    "suspend",
    "snapshots",
];

/// Errors with a definition or a home.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `vm.toml` is malformed or a field is wrong.
    #[error("{path}, line {line}: {field}: {message}", path = .path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// 1-based line (1 when the field is absent).
        line: usize,
        /// The field (`memory_mib`, `nics[1].mac`, ...).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A definition given through the API is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A file of the home cannot be read or written.
    #[error("cannot {what} {path}", path = .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The home exists already.
    #[error("{path} exists already", path = .path.display())]
    Exists {
        /// The home.
        path: PathBuf,
    },
}

/// Checks a definition; `Err((field, message))`.
pub fn check(def: &VmDefinition) -> Result<(), (String, String)> {
    let e = |f: &str, m: String| Err((f.to_string(), m));
    if let Err(m) = crate::config::check_name(&def.name) {
        return e("name", m);
    }
    if def.memory_mib < 16 {
        return e("memory_mib", format!("{} MiB is too small (at least 16)", def.memory_mib));
    }
    if def.memory_mib > 16 << 20 {
        return e("memory_mib", format!("{} MiB is too large", def.memory_mib));
    }
    if !(1..=64).contains(&def.vcpus) {
        return e("vcpus", format!("{} is not 1 to 64", def.vcpus));
    }
    match (&def.guest, &def.kernel) {
        (Some(_), Some(_)) => return e("kernel", "give either guest or kernel, not both".into()),
        (None, None) => return e("guest", "give a bundled guest (see `ferry guests`) or a kernel".into()),
        (Some(g), None) => check_guest_name(g).or_else(|m| e("guest", m))?,
        (None, Some(_)) => {}
    }
    for (i, d) in def.disks.iter().enumerate() {
        let f = format!("disks[{i}].file");
        if d.file.is_empty()
            || d.file.contains('/')
            || d.file.starts_with('.')
            || RESERVED.contains(&d.file.as_str())
        {
            return e(&f, format!("{:?} is not a file name for a disk in the home", d.file));
        }
        if def.disks[..i].iter().any(|o| o.file == d.file) {
            return e(&f, format!("{:?} is given twice", d.file));
        }
    }
    for (i, n) in def.nics.iter().enumerate() {
        if let Err(m) = parse_mac(&n.mac) {
            return e(&format!("nics[{i}].mac"), m);
        }
        if def.nics[..i].iter().any(|o| o.mac.eq_ignore_ascii_case(&n.mac)) {
            return e(&format!("nics[{i}].mac"), format!("{} is given twice", n.mac));
        }
        if let Err(m) = crate::config::check_name(&n.portgroup) {
            return e(&format!("nics[{i}].portgroup"), m);
        }
    }
    for (i, f) in def.cpu_hide.iter().enumerate() {
        if let Err(u) = ferry_arch::cpuid::parse_feature_name(f) {
            return e(&format!("cpu_hide[{i}]"), u.to_string());
        }
    }
    Ok(())
}

/// Bundled guests are checked by the VMM at start (an unknown one fails the start with
/// the VMM's message); here only the name's shape.
fn check_guest_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("{name:?} is not a guest name (see `ferry guests`)"));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff` (a unicast address).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address (six hex bytes separated by ':')");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

/// A locally administered MAC made from the VM's name and the NIC's index.
pub fn make_mac(vm: &str, index: usize) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{vm}/{index}").as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// The line of `field` (`name`, `nics[1].mac`) in `text`, if it can be found.
fn locate(text: &str, field: &str) -> Option<usize> {
    let (table, index, key) = match field.split_once('.') {
        Some((head, key)) => {
            let (t, i) = head.split_once('[')?;
            (Some(t), i.trim_end_matches(']').parse::<usize>().ok()?, key)
        }
        None => (None, 0, field),
    };
    let mut seen: Option<usize> = None; // tables of `table` seen so far (index of the current one)
    let mut in_target = table.is_none();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            in_target = false;
            if let Some(t) = table {
                if l == format!("[[{t}]]") {
                    let i = seen.map_or(0, |s| s + 1);
                    seen = Some(i);
                    in_target = i == index;
                }
            }
            continue;
        }
        if in_target {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(n + 1);
                }
            }
        }
    }
    // The table itself, when the key is missing from it.
    if let Some(t) = table {
        let mut i = 0;
        for (n, line) in text.lines().enumerate() {
            if line.trim() == format!("[[{t}]]") {
                if i == index {
                    return Some(n + 1);
                }
                i += 1;
            }
        }
    }
    None
}

/// Parses and checks `text`, the content of `path`.
pub fn parse(path: &Path, text: &str) -> Result<VmDefinition, Error> {
    let def: VmDefinition = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| crate::config::line_of(text, s.start)).unwrap_or(1);
        // The key on that line names the field; a table header names the table.
        let field = text
            .lines()
            .nth(line - 1)
            .map(|l| match l.split_once('=') {
                Some((k, _)) => k.trim().to_string(),
                None => l.trim().to_string(),
            })
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| "(file)".into());
        Error::Field { path: path.to_owned(), line, field, message: e.message().trim().to_string() }
    })?;
    check(&def).map_err(|(field, message)| Error::Field {
        path: path.to_owned(),
        line: locate(text, &field).unwrap_or(1),
        field,
        message,
    })?;
    Ok(def)
}

/// Reads `HOME/vm.toml`.
pub fn load(home: &Path) -> Result<VmDefinition, Error> {
    let path = home.join(DEFINITION_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        what: "read",
        path: path.clone(),
        source,
    })?;
    parse(&path, &text)
}

/// The TOML text of a definition.
pub fn to_toml(def: &VmDefinition) -> String {
    let body = toml::to_string(def).unwrap_or_default();
    format!("# A Ferry VM definition (see docs/host.md).\n{body}")
}

/// Makes the home `datastore/NAME` for `def`: `vm.toml` and its disks (sparse files of
/// their size), written in a temporary directory beside it and renamed into place only when
/// complete, so a failure leaves nothing behind. Fails if the home exists.
pub fn create_home(datastore: &Path, def: &VmDefinition) -> Result<PathBuf, Error> {
    let home = datastore.join(&def.name);
    if home.exists() {
        return Err(Error::Exists { path: home });
    }
    let tmp = datastore.join(format!(".{}.creating-{}", def.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let file = tmp.join(DEFINITION_FILE);
        write_synced(&file, to_toml(def).as_bytes()).map_err(io("write", &file))?;
        for d in &def.disks {
            let p = tmp.join(&d.file);
            let f = std::fs::File::create(&p).map_err(io("create", &p))?;
            f.set_len(d.size_bytes.unwrap_or(0)).map_err(io("size", &p))?;
        }
        rename_noreplace(&tmp, &home).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists { path: home.clone() }
            } else {
                Error::Io { what: "rename into place", path: home.clone(), source: e }
            }
        })?;
        std::fs::File::open(datastore).and_then(|d| d.sync_all()).map_err(io("sync", datastore))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| home)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// rename(2) that fails with `AlreadyExists` instead of replacing an empty directory.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths; AT_FDCWD resolves relative ones as rename does.
    let rc = unsafe {
        libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tap of NIC `index` of VM `vm`: `fy` + 8 hex digits of the name's hash + `n` + the
/// index (at most 15 characters, stable across daemon restarts).
pub fn tap_name(vm: &str, index: usize) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(vm.as_bytes());
    format!("fy{:02x}{:02x}{:02x}{:02x}n{index}", h[0], h[1], h[2], h[3])
}

/// The NICs' MACs, normalised to lower case.
pub fn macs(def: &VmDefinition) -> Vec<String> {
    def.nics.iter().map(|n: &NicDef| n.mac.to_ascii_lowercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name = \"web1\"\nmemory_mib = 64\nvcpus = 1\nguest = \"memstress\"\ncmdline = \"wss=8M\"\n\n\
                        [[disks]]\nfile = \"d0.img\"\nsize_bytes = 1048576\n\n[[nics]]\nmac = \"52:54:00:00:00:01\"\nportgroup = \"prod\"\n\n\
                        [[nics]]\nmac = \"52:54:00:00:00:02\"\nportgroup = \"prod\"\n";

    fn err(text: &str) -> String {
        parse(Path::new("/ds/web1/vm.toml"), text).expect_err("should fail").to_string()
    }

    #[test]
    fn parses_and_round_trips() {
        let def = parse(Path::new("vm.toml"), GOOD).expect("parses");
        assert_eq!(def.nics.len(), 2);
        assert_eq!(parse(Path::new("vm.toml"), &to_toml(&def)).expect("again"), def);
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = err(&GOOD.replace("memory_mib = 64", "memory_mib = \"lots\""));
        assert!(e.starts_with("/ds/web1/vm.toml, line 2: memory_mib:"), "{e}");
        let e = err(&GOOD.replace("memory_mib = 64", "memory_mib = 8"));
        assert!(e.starts_with("/ds/web1/vm.toml, line 2: memory_mib: 8 MiB is too small"), "{e}");
        let e = err(&GOOD.replace("52:54:00:00:00:02", "52:54:00:00:00:zz"));
        assert!(e.contains("line 16: nics[1].mac:"), "{e}");
        let e = err(&GOOD.replace("52:54:00:00:00:02", "52:54:00:00:00:01"));
        assert!(e.contains("line 16: nics[1].mac: 52:54:00:00:00:01 is given twice"), "{e}");
        let e = err(&GOOD.replace("vcpus = 1", "vcpus = 1\ncolour = \"red\""));
        assert!(e.contains("line 4: colour:") && e.contains("unknown field"), "{e}");
        let e = err(&GOOD.replace("name = \"web1\"\n", ""));
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn tap_names_fit() {
        let t = tap_name("a-very-long-virtual-machine-name", 12);
        assert!(t.len() <= 15, "{t}");
        assert_eq!(t, tap_name("a-very-long-virtual-machine-name", 12));
        assert!(parse_mac(&make_mac("x", 0)).is_ok());
    }

    #[test]
    fn create_home_is_all_or_nothing() {
        let ds = std::env::temp_dir().join(format!("ferry-vmdef-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&ds);
        std::fs::create_dir_all(&ds).expect("dir");
        let def = parse(Path::new("vm.toml"), GOOD).expect("parses");
        let home = create_home(&ds, &def).expect("create");
        assert_eq!(load(&home).expect("load"), def);
        assert_eq!(std::fs::metadata(home.join("d0.img")).expect("disk").len(), 1 << 20);
        assert!(matches!(create_home(&ds, &def), Err(Error::Exists { .. })));
        assert_eq!(std::fs::read_dir(&ds).expect("list").count(), 1, "no temporary left");
        std::fs::remove_dir_all(&ds).expect("clean");
    }
}
