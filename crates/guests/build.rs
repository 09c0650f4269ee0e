//! Builds Ferry's test guests from C and GNU assembly with the host's gcc: freestanding,
//! static, linked at 1 MiB with a PVH note by `rt/guest.ld`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Each guest: its name and its C sources (besides the shared runtime).
const GUESTS: &[(&str, &[&str])] = &[
    ("memstress", &["memstress/memstress.c"]),
    ("blkstress", &["blkstress/blkstress.c"]),
    ("netecho", &["netecho/netecho.c"]),
    ("dirtier", &["dirtier/dirtier.c", "rt/ring3.c", "rt/ring3.S"]),
];
const RUNTIME: &[&str] = &["rt/entry.S", "rt/rt.c", "rt/virtio.c"];
const HEADERS: &[&str] = &["rt/rt.h", "rt/virtio.h", "rt/ring3.h", "rt/guest.ld"];

const CFLAGS: &[&str] = &[
    "-m64",
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-mno-red-zone",
    "-mgeneral-regs-only",
];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cc = std::env::var("FERRY_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_CC");
    for f in RUNTIME.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={f}");
    }
    for (name, sources) in GUESTS {
        for s in *sources {
            println!("cargo:rerun-if-changed={s}");
        }
        build(&cc, &dir, &out, name, sources);
    }
}

fn build(cc: &str, dir: &Path, out: &Path, name: &str, sources: &[&str]) {
    let elf = out.join(format!("{name}.elf"));
    let mut cmd = Command::new(cc);
    cmd.args(CFLAGS)
        .arg("-nostdlib")
        .arg("-static")
        .arg("-no-pie")
        .arg(format!("-Wl,-T,{}", dir.join("rt/guest.ld").display()))
        .arg("-Wl,--build-id=none")
        .arg("-Wl,-z,noexecstack")
        .arg("-Wl,-z,max-page-size=4096")
        .arg("-o")
        .arg(&elf);
    for s in RUNTIME.iter().chain(sources) {
        cmd.arg(dir.join(s));
    }
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cc} to build the {name} test guest ({e}); install gcc (scripts/setup.sh)")
    });
    // ld warns about the guest's single RWX segment; that is intended, so only failures
    // are shown.
    if !output.status.success() {
        panic!(
            "building the {name} test guest failed:\n{cmd:?}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
