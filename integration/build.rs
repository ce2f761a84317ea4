//! Builds the programs the tests put into guests: the freestanding test guest
//! (guest/test-guest/guest.c) that microagent-vmm boots on any KVM, including PVM hosts
//! where guest kernel code is emulated (no SSE, no red zone, no libc, linked at 2 MiB);
//! the reset guest (guest/reset-guest/reset.S), whose first instruction resets, for
//! start-up benchmarks; and static Linux programs for the QEMU rig (vsock-echo,
//! tcp-connect, and the workload test's seccomp and io_uring probes).

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// A static Linux program: warnings are errors.
const LINUX_PROGRAM: &[&str] = &["-static", "-O2", "-Wall", "-Wextra", "-Werror"];
/// A freestanding ELF kernel linked at 2 MiB, entered at `_start`.
const BARE_KERNEL: &[&str] = &[
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,-Ttext=0x200000",
    "-Wl,-e,_start",
    "-Wl,--build-id=none",
];

/// Compiles `source` (relative to the repository) with `flags` into `OUT_DIR/name` and
/// hands its path to the crate as the environment variable `var`.
fn build(source: &str, flags: &[&str], name: &str, var: &str) {
    let source = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
        .join("..")
        .join(source);
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join(name);
    println!("cargo:rerun-if-changed={}", source.display());
    let status = Command::new(env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("running gcc for {name}: {e}"));
    assert!(status.success(), "building {name} failed");
    println!("cargo:rustc-env={var}={}", out.display());
}

fn main() {
    let test_guest: Vec<&str> = [
        "-ffreestanding",
        "-mgeneral-regs-only",
        "-mno-red-zone",
        "-O1",
        "-fno-pic",
        "-fno-stack-protector",
        "-fcf-protection=none",
        "-Wall",
        "-Wextra",
        "-Werror",
    ]
    .into_iter()
    .chain(BARE_KERNEL.iter().copied())
    .collect();
    build(
        "guest/test-guest/guest.c",
        &test_guest,
        "test-guest.elf",
        "MICROAGENT_TEST_GUEST",
    );
    // The smallest ELF kernel: resets at its first instruction.
    build(
        "guest/reset-guest/reset.S",
        BARE_KERNEL,
        "reset-guest.elf",
        "MICROAGENT_RESET_GUEST",
    );
    // For the vsock tests under QEMU.
    build(
        "guest/vsock-echo/vsock_echo.c",
        LINUX_PROGRAM,
        "vsock-echo",
        "MICROAGENT_VSOCK_ECHO",
    );
    // For the network benchmark's connection set-up rate.
    build(
        "guest/tcp-connect/tcp_connect.c",
        LINUX_PROGRAM,
        "tcp-connect",
        "MICROAGENT_TCP_CONNECT",
    );
    // For the workload compatibility test (tests/qemu_workloads.rs).
    build(
        "guest/workload-probes/seccomp_deny.c",
        LINUX_PROGRAM,
        "seccomp-deny",
        "MICROAGENT_SECCOMP_PROBE",
    );
    build(
        "guest/workload-probes/io_uring_rw.c",
        LINUX_PROGRAM,
        "io-uring-rw",
        "MICROAGENT_IO_URING_PROBE",
    );
}
