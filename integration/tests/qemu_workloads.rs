//! Workload compatibility: ordinary software from a Debian bookworm root filesystem
//! (built by `scripts/debian-rootfs.sh` with debootstrap, cached between runs) runs on
//! the project's guest kernel, booted with the agent as /init under QEMU (TCG) with our
//! blk and vsock daemons and a virtio-rng device.
//!
//! Every step runs, and the test then fails naming each step that did not pass and the
//! kernel option it depends on (docs/kernel.md says why each option is there). To see
//! what another kernel lacks, point the test at it:
//!
//! ```text
//! MICROAGENT_KERNEL=/var/lib/microagent/kernels/<old hash>/vmlinux \
//!     cargo test -p microagent-integration --test qemu_workloads
//! ```

use microagent_agent_protocol::client::Exit;
use microagent_integration::agent::{argv_request, AgentVm};
use microagent_integration::debian_rootfs::{self, debian_root_disk};
use std::process::Command;

/// What the steps need from Debian (util-linux, with `unshare`, is always there).
const PACKAGES: &[&str] = &["python3", "postgresql", "inotify-tools", "nftables"];

/// No step may hang the test: each runs under coreutils' `timeout`.
const STEP_TIMEOUT_SECS: &str = "240";

struct Step {
    name: &'static str,
    /// The kernel options the step depends on, for the failure message.
    needs: &'static str,
    user: Option<&'static str>,
    script: &'static str,
    /// What stdout must contain.
    expect: &'static str,
}

const PYTHON: &str = r#"python3 - <<'EOF'
import multiprocessing, sqlite3
def square(x):
    return x * x
if __name__ == "__main__":
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(square, range(10))
    db = sqlite3.connect("/tmp/squares.db")
    db.execute("create table t (x integer)")
    db.executemany("insert into t values (?)", [(s,) for s in squares])
    db.commit()
    print("python sum", db.execute("select sum(x) from t").fetchone()[0])
EOF"#;

const POSTGRES: &str = r#"set -e
bin=/usr/lib/postgresql/15/bin
d=$(mktemp -d /tmp/pg.XXXXXX)
if ! $bin/initdb -D $d/data -A trust -U postgres >$d/initdb.log 2>&1; then
    cat $d/initdb.log; exit 1
fi
if ! $bin/pg_ctl -D $d/data -l $d/server.log -w -t 120 \
    -o "-k $d -c listen_addresses=''" start >/dev/null; then
    cat $d/server.log; exit 1
fi
psql -h $d -U postgres -Atc "select 'postgres answer ' || 6 * 7"
$bin/pg_ctl -D $d/data -m fast -w stop >/dev/null"#;

const INOTIFY: &str = r#"f=/tmp/watched
: > $f
inotifywait -t 60 -e modify --format '%e %w' $f >/tmp/iw.out 2>/tmp/iw.err &
pid=$!
for i in $(seq 300); do
    grep -q 'Watches established' /tmp/iw.err && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
echo change >> $f
wait $pid
rc=$?
cat /tmp/iw.out /tmp/iw.err
exit $rc"#;

const UNSHARE: &str = r#"set -e
outer=$(readlink /proc/self/ns/net /proc/self/ns/mnt)
inner=$(unshare --net --pid --mount --fork sh -c \
    'echo "pid $$"; readlink /proc/self/ns/net /proc/self/ns/mnt')
echo "$inner"
[ "$(echo "$inner" | head -n 1)" = "pid 1" ]
for ns in $(echo "$inner" | tail -n +2); do
    if echo "$outer" | grep -qxF "$ns"; then echo "still in $ns"; exit 1; fi
done
echo "unshared: pid 1, new net and mount namespaces""#;

const NFT: &str = r#"nft -f - <<'EOF'
table inet filter {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        tcp dport 22 accept
        counter
    }
}
table ip nat {
    chain postrouting {
        type nat hook postrouting priority 100;
        oifname "eth0" masquerade
    }
}
EOF
nft list ruleset"#;

const OVERLAY: &str = r#"set -e
mkdir -p /tmp/ov/lower /tmp/ov/upper /tmp/ov/work /tmp/ov/merged
echo lower > /tmp/ov/lower/file
mount -t overlay overlay -o lowerdir=/tmp/ov/lower,upperdir=/tmp/ov/upper,workdir=/tmp/ov/work /tmp/ov/merged
echo upper >> /tmp/ov/merged/file
echo "overlay $(cat /tmp/ov/lower/file) $(tr '\n' ' ' < /tmp/ov/upper/file)"
umount /tmp/ov/merged"#;

const CGROUPS: &str = r#"set -e
mkdir -p /sys/fs/cgroup
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers)""#;

const HWRNG: &str = r#"echo "rng $(cat /sys/class/misc/hw_random/rng_current)"
echo "bytes $(dd if=/dev/hwrng bs=64 count=1 iflag=fullblock 2>/dev/null | wc -c)""#;

/// System calls and devices no Debian tool here exercises on its own, through ctypes.
const SYSCALLS: &str = r#"python3 - <<'EOF'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def check(name, ok):
    print(name, "ok" if ok else "failed: " + os.strerror(ctypes.get_errno()))
ctx = ctypes.c_ulong(0)
check("io_setup", libc.syscall(206, 8, ctypes.byref(ctx)) == 0)
# bpf(BPF_MAP_CREATE) of an array map: type 2, 4-byte keys and values, 1 entry.
attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)
check("bpf_map_create", libc.syscall(321, 0, attr, ctypes.sizeof(attr)) >= 0)
check("mq_open", libc.mq_open(b"/probe", os.O_CREAT | os.O_RDWR, 0o600, None) >= 0)
check("fuse", os.path.exists("/dev/fuse") and "\tfuse\n" in open("/proc/filesystems").read())
EOF"#;

const STEPS: &[Step] = &[
    Step {
        name: "python3 multiprocessing and sqlite3",
        needs: "POSIX semaphores on /dev/shm (CONFIG_SHMEM, CONFIG_TMPFS, mounted by the agent)",
        user: None,
        script: PYTHON,
        expect: "python sum 285",
    },
    Step {
        name: "PostgreSQL initdb, start, query over a unix socket",
        needs: "CONFIG_SYSVIPC (System V shared memory)",
        user: Some("postgres"),
        script: POSTGRES,
        expect: "postgres answer 42",
    },
    Step {
        name: "inotifywait notices a change",
        needs: "CONFIG_INOTIFY_USER",
        user: None,
        script: INOTIFY,
        expect: "MODIFY /tmp/watched",
    },
    Step {
        name: "unshare --net --pid --mount --fork",
        needs: "CONFIG_NAMESPACES, CONFIG_PID_NS, CONFIG_NET_NS",
        user: None,
        script: UNSHARE,
        expect: "unshared: pid 1, new net and mount namespaces",
    },
    Step {
        name: "nft loads an inet filter table and a NAT chain",
        needs: "CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET, CONFIG_NFT_CT, CONFIG_NFT_NAT, CONFIG_NFT_MASQ",
        user: None,
        script: NFT,
        expect: "oifname \"eth0\" masquerade",
    },
    Step {
        name: "a seccomp filter refuses getppid",
        needs: "CONFIG_SECCOMP, CONFIG_SECCOMP_FILTER",
        user: None,
        script: "/usr/local/bin/seccomp-deny",
        expect: "seccomp: getppid refused with EPERM",
    },
    Step {
        name: "I/O through io_uring",
        needs: "CONFIG_IO_URING",
        user: None,
        script: "/usr/local/bin/io-uring-rw /tmp/uring.dat",
        expect: "io_uring: wrote and read back 4096 bytes",
    },
    Step {
        name: "/dev/hwrng gives bytes",
        needs: "CONFIG_HW_RANDOM, CONFIG_HW_RANDOM_VIRTIO",
        user: None,
        script: HWRNG,
        expect: "rng virtio_rng.0\nbytes 64\n",
    },
    Step {
        name: "an overlay mount",
        needs: "CONFIG_OVERLAY_FS",
        user: None,
        script: OVERLAY,
        expect: "overlay lower lower upper",
    },
    Step {
        name: "cgroup v2 with memory and pids controllers",
        needs: "CONFIG_CGROUPS, CONFIG_MEMCG, CONFIG_CGROUP_PIDS",
        user: None,
        script: CGROUPS,
        expect: "memory pids",
    },
    Step {
        name: "io_setup, bpf(BPF_MAP_CREATE), mq_open and /dev/fuse",
        needs: "CONFIG_AIO, CONFIG_BPF_SYSCALL, CONFIG_POSIX_MQUEUE, CONFIG_FUSE_FS",
        user: None,
        script: SYSCALLS,
        expect: "io_setup ok\nbpf_map_create ok\nmq_open ok\nfuse ok\n",
    },
    Step {
        name: "the kernel's config in /proc/config.gz",
        needs: "CONFIG_IKCONFIG, CONFIG_IKCONFIG_PROC",
        user: None,
        script: "zcat /proc/config.gz | grep -x CONFIG_IO_URING=y",
        expect: "CONFIG_IO_URING=y",
    },
];

#[test]
fn debian_workloads_run_on_the_guest_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let disk = debian_root_disk(PACKAGES, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let mut ws = AgentVm::boot_with(dir.path(), Some(&disk), "workloads", |c| {
        c.memory_mib = 1024;
        c.rng = true;
    });
    for (name, env) in [
        ("seccomp-deny", env!("MICROAGENT_SECCOMP_PROBE")),
        ("io-uring-rw", env!("MICROAGENT_IO_URING_PROBE")),
    ] {
        let program = std::fs::read(env).unwrap();
        ws.connect()
            .write_file(&format!("/usr/local/bin/{name}"), 0o755, &program)
            .unwrap();
    }

    let mut failures = Vec::new();
    for step in STEPS {
        let mut request = argv_request(&["timeout", STEP_TIMEOUT_SECS, "sh", "-c", step.script]);
        request.user = step.user.map(str::to_owned);
        request.cwd = Some("/tmp".into());
        let (exit, out, err) = ws.run_with(request, Vec::new());
        let out = String::from_utf8_lossy(&out);
        if exit != Exit::Code(0) || !out.contains(step.expect) {
            failures.push(format!(
                "step {:?} failed (depends on {}): {exit:?}, expected {:?} on stdout\n\
                 stdout: {}\nstderr: {}",
                step.name,
                step.needs,
                step.expect,
                out.trim_end(),
                String::from_utf8_lossy(&err).trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} workload steps failed:\n\n{}",
        failures.len(),
        STEPS.len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_debian_mirror_that_cannot_be_reached_fails_with_a_clear_message() {
    let cache = tempfile::tempdir().unwrap();
    // Nothing listens on the discard port of loopback: the connection is refused.
    let mirror = "http://127.0.0.1:9/debian";
    let out = Command::new(debian_rootfs::script())
        .arg("python3")
        .env("MICROAGENT_DEBIAN_MIRROR", mirror)
        .env("MICROAGENT_CACHE", cache.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "debian-rootfs: debootstrap could not fetch bookworm from {mirror}: check the network or set MICROAGENT_DEBIAN_MIRROR"
        )),
        "{stderr}"
    );
    // Nothing half-built is left to be taken for a cached image (only the build lock).
    let entries: Vec<_> = std::fs::read_dir(cache.path().join("debian-rootfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| !name.to_string_lossy().ends_with(".lock"))
        .collect();
    assert_eq!(entries, Vec::<std::ffi::OsString>::new());
}
