//! The guest-visible CPU model under `microagent-vmm` with real Linux (here where this
//! host's KVM runs Linux guests, otherwise in the nested rig's L1): with 2 and 4 vCPUs
//! Linux sees one socket of that many single-thread cores and the TSC-deadline timer
//! (issue 21; the CPUID itself is unit-tested over recorded tables in vmm/src/cpu).

use microagent_integration::initramfs::busybox_init;
use microagent_integration::kernel::guest_kernel;
use microagent_integration::nested::on_linux_kvm;
use microagent_integration::qemu::GUEST_PRELUDE;
use microagent_integration::vmm::VmmArgs;
use std::collections::BTreeSet;
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

#[test]
fn linux_sees_one_socket_of_n_cores_with_the_tsc_deadline_timer() {
    on_linux_kvm(
        "linux_sees_one_socket_of_n_cores_with_the_tsc_deadline_timer",
        || {
            for cpus in [2u8, 4] {
                let dir = tempfile::tempdir().unwrap();
                let initrd = dir.path().join("initrd.cpio");
                let mut image = busybox_init(&format!("{GUEST_PRELUDE}{SCRIPT}")).unwrap();
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
