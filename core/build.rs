//! Compiles the TLS probes' BPF program (bpf/tls.bpf.c) with clang, CO-RE against this kernel's BTF
//! (vmlinux.h made by bpftool from /sys/kernel/btf/vmlinux). Without clang, bpftool or BTF the core still
//! builds: the object is left empty and `--tls-port` says at start what was missing.
use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/tls.bpf.c");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("tls.bpf.o");
    let missing = match compile(&out, &object) {
        Ok(()) => String::new(),
        Err(reason) => {
            fs::write(&object, b"").expect("OUT_DIR is writable");
            println!("cargo:warning=TLS probes not built: {reason}");
            reason
        }
    };
    println!("cargo:rustc-env=TLS_BPF_MISSING={missing}");
}

fn compile(out: &std::path::Path, object: &std::path::Path) -> Result<(), String> {
    let btf = "/sys/kernel/btf/vmlinux";
    if !std::path::Path::new(btf).exists() {
        return Err(format!("the build host's kernel has no BTF ({btf})"));
    }
    let dump = Command::new("bpftool")
        .args(["btf", "dump", "file", btf, "format", "c"])
        .output()
        .map_err(|error| format!("bpftool not found ({error}); install Debian's bpftool"))?;
    if !dump.status.success() {
        return Err(format!("bpftool could not read {btf}: {}", String::from_utf8_lossy(&dump.stderr).trim()));
    }
    fs::write(out.join("vmlinux.h"), dump.stdout).map_err(|error| error.to_string())?;
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => return Err(format!("no BPF register layout known for {other}")),
        Err(_) => return Err("cargo did not say the target's architecture".to_string()),
    };
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    let compiled = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg("-I")
        .arg(out)
        .arg("-c")
        .arg("bpf/tls.bpf.c")
        .arg("-o")
        .arg(object)
        .output()
        .map_err(|error| format!("{clang} not found ({error}); install Debian's clang and libbpf-dev"))?;
    if !compiled.status.success() {
        return Err(format!("{clang} failed: {}", String::from_utf8_lossy(&compiled.stderr).trim()));
    }
    Ok(())
}
