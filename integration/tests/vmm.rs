//! `microagent-vmm` on this machine's KVM: the freestanding test guest boots, drives
//! virtio-blk through qemu-storage-daemon and through microagent-vhost-blk, pauses and
//! resumes; the project's Linux kernel starts and, on a PVM-only host, stops with a
//! structured emulation-failure error.

use microagent_integration::daemon::Daemon;
use microagent_integration::kernel::guest_kernel;
use microagent_integration::storage_daemon::StorageDaemon;
use microagent_integration::vmm::{Vmm, VmmArgs};
use microagent_vmm::host::linux_guest_limitation;
use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

const RUN: Duration = Duration::from_secs(60);

#[test]
fn test_guest_prints_the_exact_command_line_and_i8042_reset_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cmdline = "console=ttyS0 scenario=banner token=7f3a9c";
    let (output, console) = VmmArgs::test_guest(cmdline).run(dir.path(), RUN).unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        console.contains(&format!("microagent test guest: cmdline=[{cmdline}]")),
        "{console}"
    );
    assert!(console.contains("TEST-GUEST-DONE"));
}

#[test]
fn a_vcpu_that_asks_for_a_reset_runs_no_further_guest_code() {
    // The guest's next instructions print. A vCPU that re-entered the guest after the
    // request printed in about half the runs, until the main loop stopped it: five runs.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let (output, console) = VmmArgs::test_guest("scenario=reset_then_print")
            .run(dir.path(), RUN)
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{output:?}");
        assert!(stderr.contains("i8042 reset"), "{stderr}");
        assert!(
            console.contains("cmdline=[scenario=reset_then_print"),
            "{console}"
        );
        assert!(!console.contains("AFTER"), "{console}");
    }
}

/// Guest memory is mapped, not populated, at start-up: a VMM running a guest with
/// 1 GiB holds a few MiB of it (what the guest and boot set-up touched).
#[test]
fn start_up_does_not_populate_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = VmmArgs::test_guest("scenario=halt");
    args.memory_mib = 1024;
    let vmm = Vmm::start(&args, dir.path()).unwrap();
    vmm.wait_for("HALTING", RUN).unwrap();
    let pid = vmm.pid().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |field: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    };
    let (rss, shmem) = (kib("VmRSS:"), kib("RssShmem:"));
    assert!(shmem < 16 << 10, "{shmem} KiB of guest memory resident");
    assert!(rss < 64 << 10, "VmRSS {rss} KiB for a 1 GiB guest");
}

fn blk_through(dir: &Path, socket: &Path, disk: &Path) {
    let mut args =
        VmmArgs::test_guest("scenario=blk blk_pattern=written-by-test-guest blk_sector=6");
    args.blk.push(socket.to_owned());
    let (output, console) = args.run(dir, RUN).unwrap();
    assert!(output.status.success(), "{output:?}\n{console}");
    assert!(
        console.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{console}"
    );
    assert!(console.contains("BLK-CAPACITY=2048"), "{console}");
    assert!(console.contains("BLK-WRITE-STATUS=0"), "{console}");
    assert!(
        console.contains("BLK-READBACK=written-by-test-guest"),
        "{console}"
    );
    let contents = fs::read(disk).unwrap();
    assert_eq!(&contents[6 * 512..6 * 512 + 21], b"written-by-test-guest");
}

#[test]
fn test_guest_writes_through_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let export = StorageDaemon::start(&disk, &dir.path().join("qsd.sock"), true).unwrap();
    blk_through(dir.path(), export.socket(), &disk);
}

#[test]
fn test_guest_writes_through_microagent_vhost_blk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    blk_through(dir.path(), &socket, &disk);
    // The VMM's exit disconnects the frontend; the daemon then exits cleanly.
    assert!(daemon.wait_exit(Duration::from_secs(10)).unwrap().success());
}

fn ticks(console: &str) -> usize {
    console.matches("tick ").count()
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(&VmmArgs::test_guest("scenario=counter"), dir.path()).unwrap();
    vmm.wait_for("tick 3\n", RUN).unwrap();

    let reply = vmm.api(r#"{"cmd":"pause"}"#).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "paused", "{reply}");
    let paused_at = ticks(&vmm.console());
    sleep(Duration::from_millis(500));
    assert_eq!(
        ticks(&vmm.console()),
        paused_at,
        "the guest ran while paused"
    );
    assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["state"], "paused");

    let reply = vmm.api(r#"{"cmd":"resume"}"#).unwrap();
    assert_eq!(reply["state"], "running", "{reply}");
    vmm.wait_for(&format!("tick {}\n", paused_at + 3), RUN)
        .unwrap();
}

#[test]
fn every_vcpu_of_a_four_cpu_vm_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = VmmArgs::test_guest("scenario=counter");
    args.extra = vec!["--cpus".into(), "4".into()];
    let vmm = Vmm::start(&args, dir.path()).unwrap();
    vmm.wait_for("tick 1\n", RUN).unwrap();
    let reply = vmm.api(r#"{"cmd":"pause"}"#).unwrap();
    assert_eq!(reply["vcpus"], 4, "{reply}");
    assert_eq!(reply["state"], "paused", "{reply}");
    assert_eq!(vmm.api(r#"{"cmd":"resume"}"#).unwrap()["state"], "running");
}

#[test]
fn a_halted_guest_pauses_and_shutdown_ends_the_vmm_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(&VmmArgs::test_guest("scenario=halt"), dir.path()).unwrap();
    vmm.wait_for("HALTING", RUN).unwrap();
    assert_eq!(vmm.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
    assert_eq!(vmm.api(r#"{"cmd":"resume"}"#).unwrap()["state"], "running");
    let bad = vmm.api(r#"{"cmd":"explode"}"#).unwrap();
    assert_eq!(bad["error"]["code"], "api.bad_request", "{bad}");
    let reply = vmm.api(r#"{"cmd":"shutdown"}"#).unwrap();
    assert_eq!(reply["ok"], true);
    assert!(vmm.wait_exit(Duration::from_secs(10)).unwrap().success());
    assert!(
        !dir.path().join("api.sock").exists(),
        "control socket left behind"
    );
}

#[test]
fn a_dead_daemon_is_reported_and_the_vmm_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let daemon = Daemon::start(
        "microagent-vhost-blk",
        &socket,
        ["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let mut args = VmmArgs::test_guest("scenario=halt");
    args.blk.push(socket);
    let mut vmm = Vmm::start(&args, dir.path()).unwrap();
    vmm.wait_for("HALTING", RUN).unwrap();
    assert_eq!(
        vmm.api(r#"{"cmd":"status"}"#).unwrap()["devices"][0]["failed"],
        false
    );

    drop(daemon); // SIGKILL
    let mut failed = false;
    for _ in 0..100 {
        let status = vmm.api(r#"{"cmd":"status"}"#).unwrap();
        if status["devices"][0]["failed"] == true {
            assert_eq!(status["state"], "running");
            failed = true;
            break;
        }
        sleep(Duration::from_millis(20));
    }
    assert!(failed, "the VMM never noticed the daemon died");
    assert!(
        vmm.try_status().unwrap().is_none(),
        "the VMM died with its daemon"
    );
}

#[test]
fn linux_kernel_starts_with_our_devices_and_pvm_stops_it_with_a_structured_error() {
    if linux_guest_limitation().is_none() {
        // Elsewhere Linux boots fully (tests/linux_vmm.rs); this checks the PVM error.
        microagent_integration::report::not_run(
            "linux_kernel_starts_with_our_devices_and_pvm_stops_it_with_a_structured_error",
            "needs a PVM host (this host's KVM runs Linux guests)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let export = StorageDaemon::start(&disk, &dir.path().join("qsd.sock"), true).unwrap();
    let mut args = VmmArgs::test_guest("console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1");
    args.kernel = guest_kernel().unwrap();
    args.memory_mib = 256;
    args.blk.push(export.socket().to_owned());
    let (output, console) = args.run(dir.path(), Duration::from_secs(240)).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        console.contains(
            "Command line: console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 virtio_mmio.device=4K@0xd0000000:5"
        ),
        "console:\n{console}\nVMM stderr:\n{stderr}"
    );
    assert!(!output.status.success(), "the VMM claimed success");
    let report: serde_json::Value = stderr
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON error on stderr:\n{stderr}"));
    assert_eq!(report["error"]["code"], "vmm.emulation_failure", "{report}");
    assert!(
        report["error"]["rip"]
            .as_str()
            .unwrap()
            .starts_with("0xffffffff8"),
        "{report}"
    );
    assert!(
        report["error"]["hint"].as_str().unwrap().contains("PVM"),
        "{report}"
    );
}

#[test]
fn test_guest_reaches_a_host_listener_through_microagent_vhost_vsock() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock");
    let socket = dir.path().join("vhost-vsock.sock");
    let _daemon = Daemon::start(
        "microagent-vhost-vsock",
        &socket,
        ["--guest-cid", "3", "--uds-path", uds.to_str().unwrap()],
    )
    .unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).unwrap();
        conn.write_all(&[b"echo:", &buf[..n]].concat()).unwrap();
        buf[..n].to_vec()
    });
    let mut args = VmmArgs::test_guest("scenario=vsock vsock_port=5000 vsock_msg=ping-from-kvm");
    args.extra = vec!["--vsock".into(), socket.into()];
    let (output, console) = args.run(dir.path(), RUN).unwrap();
    assert!(output.status.success(), "{output:?}\n{console}");
    assert!(console.contains("VSOCK-CID=3"), "{console}");
    assert!(
        console.contains("VSOCK-ECHO=echo:ping-from-kvm"),
        "{console}"
    );
    assert_eq!(host.join().unwrap(), b"ping-from-kvm");
}

/// The test guest drives the virtio-net device through microagent-vmm's vhost-user
/// frontend and our net daemon on this machine's KVM: ARP for the gateway, then an ICMP
/// echo to it.
#[test]
fn test_guest_arps_and_pings_the_gateway_through_microagent_vhost_net() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost-net.sock");
    let _daemon = Daemon::start(
        "microagent-vhost-net",
        &socket,
        ["--mac", "52:54:00:12:34:99", "--dns", "127.0.0.1:9"],
    )
    .unwrap();
    let mut args = VmmArgs::test_guest("scenario=net");
    args.extra = vec!["--net".into(), socket.into()];
    let (output, console) = args.run(dir.path(), RUN).unwrap();
    assert!(output.status.success(), "{output:?}\n{console}");
    assert!(console.contains("NET-MAC=52:54:00:12:34:99\n"), "{console}");
    let gateway = microagent_vhost_net::frame::GATEWAY_MAC
        .0
        .map(|b| format!("{b:02x}"))
        .join(":");
    assert!(
        console.contains(&format!("NET-ARP={gateway}\n")),
        "{console}"
    );
    assert!(console.contains("NET-PING=ok\n"), "{console}");
    assert!(!console.contains("NET-FAIL"), "{console}");
}

// ---- The control socket never blocks the event loop (issue 19 item 2, issue 16) ----

mod control_socket {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;

    fn connect(vmm: &Vmm) -> UnixStream {
        let stream = UnixStream::connect(vmm.api_socket()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    fn read_reply(reader: &mut impl BufRead) -> serde_json::Value {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    #[test]
    fn a_client_sending_half_a_line_does_not_stall_another_client() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Vmm::start(&VmmArgs::test_guest("scenario=counter"), dir.path()).unwrap();
        vmm.wait_for("tick 1\n", RUN).unwrap();
        let mut slow = connect(&vmm);
        slow.write_all(br#"{"cmd":"sta"#).unwrap();
        sleep(Duration::from_millis(100));
        // Before the fix the loop sat in a blocking read of the slow client.
        let reply = vmm.api(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(reply["state"], "running", "{reply}");
        let reply = vmm.api(r#"{"cmd":"pause"}"#).unwrap();
        assert_eq!(reply["state"], "paused", "{reply}");
        // The slow client's line, once finished, is answered.
        slow.write_all(b"tus\"}\n").unwrap();
        let reply = read_reply(&mut BufReader::new(slow));
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["state"], "paused", "{reply}");
    }

    #[test]
    fn pipelined_requests_in_one_write_are_all_answered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Vmm::start(&VmmArgs::test_guest("scenario=halt"), dir.path()).unwrap();
        vmm.wait_for("HALTING", RUN).unwrap();
        let mut conn = connect(&vmm);
        conn.write_all(
            b"{\"cmd\":\"status\"}\n{\"cmd\":\"pause\"}\n{\"cmd\":\"explode\"}\n{\"cmd\":\"resume\"}\n",
        )
        .unwrap();
        let mut reader = BufReader::new(conn);
        assert_eq!(read_reply(&mut reader)["state"], "running");
        assert_eq!(read_reply(&mut reader)["state"], "paused");
        let bad = read_reply(&mut reader);
        assert_eq!(bad["error"]["code"], "api.bad_request", "{bad}");
        assert_eq!(read_reply(&mut reader)["state"], "running");
    }

    #[test]
    fn a_client_that_never_reads_its_replies_does_not_stall_the_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Vmm::start(&VmmArgs::test_guest("scenario=halt"), dir.path()).unwrap();
        vmm.wait_for("HALTING", RUN).unwrap();
        let mut flood = connect(&vmm);
        let writer = std::thread::spawn(move || {
            let request = b"{\"cmd\":\"status\"}\n".repeat(20_000);
            let _ = flood.write_all(&request);
            flood
        });
        sleep(Duration::from_millis(500));
        // Before the fix the loop sat in a blocking write to the flooding client.
        let reply = vmm.api(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        let mut flood = writer.join().unwrap();
        // The VMM dropped the client once its unread replies passed the bound: reading
        // ends (EOF or reset) well short of 20,000 replies instead of timing out.
        let mut answer = Vec::new();
        let end = flood.read_to_end(&mut answer);
        if let Err(e) = &end {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        let replies = answer.iter().filter(|&&b| b == b'\n').count();
        assert!(
            replies < 20_000,
            "all {replies} replies were kept for the client"
        );
        assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["ok"], true);
    }

    #[test]
    fn an_oversized_line_drops_that_client_and_the_vmm_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Vmm::start(&VmmArgs::test_guest("scenario=halt"), dir.path()).unwrap();
        vmm.wait_for("HALTING", RUN).unwrap();
        let mut big = connect(&vmm);
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0usize;
        while sent < 200 << 20 {
            if big.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        assert!(sent < 8 << 20, "the VMM took {sent} bytes of one line");
        let mut answer = Vec::new();
        let _ = big.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("api.line_too_long"), "{answer:?}");
        let rss_kib = fs::read_to_string(format!("/proc/{}/status", vmm.pid().unwrap()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap();
        assert!(rss_kib < 64 << 10, "VMM RSS {rss_kib} KiB");
        assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["ok"], true);
    }

    #[test]
    fn shutdown_with_a_huge_timeout_neither_overflows_nor_spins() {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = Vmm::start(&VmmArgs::test_guest("scenario=halt"), dir.path()).unwrap();
        vmm.wait_for("HALTING", RUN).unwrap();
        // The old deadline became `left_ms as i32 + 1`: 2^31 ms (left 2^31 - 1 a few
        // microseconds later) overflowed that addition and the VMM panicked; near 2^32
        // it wrapped to an epoll timeout of 0 (a spin).
        for timeout_ms in [1u64 << 31, (1 << 31) + 1, (1 << 32) - 1, 1 << 32, u64::MAX] {
            let reply = vmm
                .api(&format!(
                    r#"{{"cmd":"shutdown","timeout_ms":{timeout_ms}}}"#
                ))
                .unwrap_or_else(|e| panic!("timeout_ms {timeout_ms}: {e}"));
            assert_eq!(reply["state"], "stopping", "{reply}");
        }
        let before = vmm.main_thread_cpu().unwrap();
        sleep(Duration::from_secs(1));
        let used = vmm.main_thread_cpu().unwrap() - before;
        assert!(
            used < Duration::from_millis(200),
            "event loop used {used:?} of 1 s"
        );
        assert!(vmm.try_status().unwrap().is_none(), "the VMM ended early");
        let reply = vmm.api(r#"{"cmd":"shutdown","timeout_ms":0}"#).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        assert!(vmm.wait_exit(Duration::from_secs(10)).unwrap().success());
    }

    #[test]
    fn running_out_of_file_descriptors_does_not_spin_the_accept_loop() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = Vmm::start(&VmmArgs::test_guest("scenario=halt"), dir.path()).unwrap();
        vmm.wait_for("HALTING", RUN).unwrap();
        let pid = vmm.pid().unwrap();
        let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
        let set_limit = |soft: u64| {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: 4096,
            };
            // SAFETY: prlimit on a child we started, with a valid rlimit and no old-value
            // pointer.
            let rc = unsafe {
                libc::prlimit(
                    pid as libc::pid_t,
                    libc::RLIMIT_NOFILE,
                    &limit,
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        };
        set_limit(open + 2);
        let clients: Vec<UnixStream> = (0..8).map(|_| connect(&vmm)).collect();
        sleep(Duration::from_millis(200));
        let before = vmm.main_thread_cpu().unwrap();
        sleep(Duration::from_secs(1));
        let used = vmm.main_thread_cpu().unwrap() - before;
        assert!(
            used < Duration::from_millis(200),
            "event loop used {used:?} of 1 s"
        );
        drop(clients);
        set_limit(1024);
        // After the back-off the VMM accepts again.
        assert_eq!(vmm.api(r#"{"cmd":"status"}"#).unwrap()["ok"], true);
    }
}
