//! Compiles the C BPF programs in `bpf/` with `clang -O2 -g -target bpf`:
//! `ridge.bpf.c` (the dataplane's programs) into `ridge.bpf.o` and
//! `impair.bpf.c` (the test impairment) into `impair.bpf.o`; the crate
//! embeds both (`include_bytes!`).
//!
//! `$CLANG` names the compiler (default `clang`). A missing compiler or
//! missing libbpf headers stop the build with a message that says what to
//! install.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["bpf/ridge.bpf.c", "bpf/impair.bpf.c", "bpf/ridge.h"];

/// (source, object in `$OUT_DIR`) for each BPF object the crate embeds.
const OBJECTS: &[(&str, &str)] = &[
    ("bpf/ridge.bpf.c", "ridge.bpf.o"),
    ("bpf/impair.bpf.c", "impair.bpf.o"),
];

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let hint = "install it with `apt-get install clang libbpf-dev linux-libc-dev` \
                (or run `bash tests/install-deps.sh`), or point $CLANG at a clang binary";

    match Command::new(&clang).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => fail(&format!(
            "`{clang} --version` failed ({}): {}; {hint}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => fail(&format!(
            "ridge-ebpf needs clang to compile its BPF programs, but `{clang}` cannot be run ({e}); {hint}"
        )),
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail(&format!(
            "ridge-ebpf needs the libbpf headers (/usr/include/bpf/bpf_helpers.h is missing); {hint}"
        ));
    }

    let multiarch = multiarch_include();
    for (source, object) in OBJECTS {
        compile(&clang, multiarch.as_deref(), source, &out_dir.join(object));
    }
}

fn compile(clang: &str, multiarch: Option<&Path>, source: &str, object: &Path) {
    let mut cmd = Command::new(clang);
    cmd.args([
        "-O2",
        "-g",
        "-target",
        "bpf",
        "-Wall",
        "-Werror",
        "-std=gnu11",
    ])
    .arg("-Ibpf");
    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the
    // host's multiarch directory; `-target bpf` does not search it.
    if let Some(dir) = multiarch {
        cmd.arg(format!("-I{}", dir.display()));
    }
    cmd.args(["-c", source, "-o"]).arg(object);
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("running {clang}: {e}")));
    if !status.success() {
        fail(&format!(
            "{clang} failed to compile {source} ({status}); see the errors above"
        ));
    }
}

/// The multiarch include directory (`/usr/include/x86_64-linux-gnu` and the
/// like) of the machine that builds, if it exists.
fn multiarch_include() -> Option<PathBuf> {
    let from_cc = Command::new("cc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty());
    let triple = from_cc.unwrap_or_else(|| {
        let arch = env::consts::ARCH;
        match arch {
            "x86" => "i386-linux-gnu".to_owned(),
            "arm" => "arm-linux-gnueabihf".to_owned(),
            "powerpc64" if cfg!(target_endian = "little") => "powerpc64le-linux-gnu".to_owned(),
            other => format!("{other}-linux-gnu"),
        }
    });
    let dir = PathBuf::from("/usr/include").join(triple);
    dir.join("asm/types.h").exists().then_some(dir)
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
