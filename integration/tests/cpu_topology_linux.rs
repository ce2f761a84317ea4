//! The guest-visible CPU model under `microagent-vmm` with real Linux (here where this
//! host's KVM runs Linux guests, otherwise in the nested rig's L1): with 2 and 4 vCPUs
//! Linux sees one socket of that many single-thread cores and the TSC-deadline timer
//! (issue 21; the CPUID itself is unit-tested over recorded tables in vmm/src/cpu), and
//! a guest paused for 60 s resumes without RCU stall or soft-lockup reports.

use microagent_integration::initramfs::busybox_init;
use microagent_integration::kernel::guest_kernel;
use microagent_integration::nested::on_linux_kvm;
use microagent_integration::qemu::GUEST_PRELUDE;
use microagent_integration::vmm::{Vmm, VmmArgs};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(120);

const SCRIPT: &str = "echo NPROC=$(nproc)
grep -E '^(physical id|core id|siblings|cpu cores)' /proc/cpuinfo | sed -e 's/[[:space:]]*:[[:space:]]*/=/' -e 's/ /_/g' -e 's/^/CPUINFO:/'
grep -q tsc_deadline_timer /proc/cpuinfo && echo TSC-DEADLINE=yes
echo CPUINFO-DONE
reboot -f
";

/// Values of `CPUINFO:key=value` lines for `key`, one per CPU.
fn field<'a>(console: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("CPUINFO:{key}=");
    console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix.as_str()))
        .collect()
}

/// The project kernel with a busybox /init running `script`, on `cpus` vCPUs.
fn guest(dir: &Path, cpus: u8, script: &str) -> VmmArgs {
    let initrd = dir.join("initrd.cpio");
    let mut image = busybox_init(&format!("{GUEST_PRELUDE}{script}")).unwrap();
    image.dir("proc").dir("sys").dir("dev");
    image.write(&initrd).unwrap();
    let mut args = VmmArgs::test_guest("console=ttyS0 reboot=k panic=1");
    args.kernel = guest_kernel().unwrap();
    args.memory_mib = 256;
    args.extra = vec![
        "--initrd".into(),
        initrd.into(),
        "--cpus".into(),
        cpus.to_string().into(),
    ];
    args
}

#[test]
fn a_guest_paused_for_60_s_resumes_without_stall_reports() {
    on_linux_kvm(
        "a_guest_paused_for_60_s_resumes_without_stall_reports",
        || {
            let dir = tempfile::tempdir().unwrap();
            let script = "i=0; while :; do i=$((i+1)); echo tick-$i; sleep 1; done\n";
            let vmm = Vmm::start(&guest(dir.path(), 2, script), dir.path()).unwrap();
            vmm.wait_for("tick-3\r", BOOT).unwrap();
            assert_eq!(vmm.api(r#"{"cmd":"pause"}"#).unwrap()["state"], "paused");
            std::thread::sleep(Duration::from_secs(60));
            assert_eq!(vmm.api(r#"{"cmd":"resume"}"#).unwrap()["state"], "running");
            let ticks = |console: &str| console.matches("tick-").count();
            let before = ticks(&vmm.console());
            // Stall detectors run from the timer tick: give them several seconds.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while ticks(&vmm.console()) < before + 10 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(500));
            }
            let console = vmm.console();
            assert!(
                ticks(&console) >= before + 10,
                "the guest runs on: {console}"
            );
            for stall in [
                "rcu_sched self-detected stall",
                "detected stalls",
                "soft lockup",
                "rcu: INFO",
            ] {
                assert!(!console.contains(stall), "{stall}: {console}");
            }
        },
    );
}

#[test]
fn linux_sees_one_socket_of_n_cores_with_the_tsc_deadline_timer() {
    on_linux_kvm(
        "linux_sees_one_socket_of_n_cores_with_the_tsc_deadline_timer",
        || {
            for cpus in [2u8, 4] {
                let dir = tempfile::tempdir().unwrap();
                let args = guest(dir.path(), cpus, SCRIPT);
                let (_output, console) = args.run(dir.path(), BOOT).unwrap();
                assert!(console.contains("CPUINFO-DONE"), "{console}");
                let n = usize::from(cpus);
                assert!(console.contains(&format!("NPROC={cpus}")), "{console}");
                assert_eq!(field(&console, "physical_id"), vec!["0"; n], "{console}");
                let want = cpus.to_string();
                assert_eq!(
                    field(&console, "siblings"),
                    vec![want.as_str(); n],
                    "{console}"
                );
                assert_eq!(
                    field(&console, "cpu_cores"),
                    vec![want.as_str(); n],
                    "{console}"
                );
                let cores: BTreeSet<String> = field(&console, "core_id")
                    .into_iter()
                    .map(String::from)
                    .collect();
                let expected: BTreeSet<String> = (0..cpus).map(|c| c.to_string()).collect();
                assert_eq!(cores, expected, "{console}");
                assert!(console.contains("TSC-DEADLINE=yes"), "{console}");
            }
        },
    );
}
