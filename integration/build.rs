//! Builds the programs the tests put into guests: the freestanding test guest
//! (guest/test-guest/guest.c) that microagent-vmm boots on any KVM, including PVM hosts
//! where guest kernel code is emulated (no SSE, no red zone, no libc, linked at 2 MiB);
//! the reset guest (guest/reset-guest/reset.S), whose first instruction resets, for
//! start-up benchmarks; and static Linux programs for the QEMU rig (vsock-echo,
//! tcp-connect).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../guest/test-guest/guest.c");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("test-guest.elf");
    println!("cargo:rerun-if-changed={}", source.display());
    let status = Command::new(env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args([
            "-ffreestanding",
            "-mgeneral-regs-only",
            "-mno-red-zone",
            "-nostdlib",
            "-static",
            "-O1",
            "-fno-pic",
            "-no-pie",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,-Ttext=0x200000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("running gcc for the test guest");
    assert!(status.success(), "building the test guest failed");
    println!("cargo:rustc-env=MICROAGENT_TEST_GUEST={}", out.display());

    // A static Linux program for the vsock tests under QEMU.
    let source = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
        .join("../guest/vsock-echo/vsock_echo.c");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("vsock-echo");
    println!("cargo:rerun-if-changed={}", source.display());
    let status = Command::new(env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("running gcc for vsock-echo");
    assert!(status.success(), "building vsock-echo failed");
    println!("cargo:rustc-env=MICROAGENT_VSOCK_ECHO={}", out.display());

    // The smallest ELF kernel: resets at its first instruction.
    let source =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../guest/reset-guest/reset.S");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("reset-guest.elf");
    println!("cargo:rerun-if-changed={}", source.display());
    let status = Command::new(env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,-Ttext=0x200000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("running gcc for the reset guest");
    assert!(status.success(), "building the reset guest failed");
    println!("cargo:rustc-env=MICROAGENT_RESET_GUEST={}", out.display());

    // A static Linux program for the network benchmark's connection set-up rate.
    let source = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
        .join("../guest/tcp-connect/tcp_connect.c");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("tcp-connect");
    println!("cargo:rerun-if-changed={}", source.display());
    let status = Command::new(env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("running gcc for tcp-connect");
    assert!(status.success(), "building tcp-connect failed");
    println!("cargo:rustc-env=MICROAGENT_TCP_CONNECT={}", out.display());
}
