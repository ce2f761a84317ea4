//! Named points in create, start, snapshot create, rollback and fork where a debug build can be made to
//! die, so that tests prove an interrupted command leaves nothing a rerun or `delete`
//! cannot clean up. With `MICROAGENT_TEST_KILL_AT=<point>` a debug build SIGKILLs
//! itself on reaching that point, exactly as `kill -9` at that moment would; release
//! builds do not read the variable.

/// The environment variable a debug build reads.
pub const KILL_AT_ENV: &str = "MICROAGENT_TEST_KILL_AT";

/// Every point, in the order a command passes them (`microagent` tests kill at each).
pub const POINTS: &[&str] = &[
    "create.disk_built",
    "create.disk_copied",
    "start.daemon_spawned",
    "start.daemons_up",
    "start.vmm_spawned",
    "snapshot.paused",
    "snapshot.vm_written",
    "snapshot.disk_copied",
    "rollback.disk_copied",
    "rollback.disk_replaced",
    "fork.disk_copied",
    "fork.in_place",
    "fork.running",
];

/// Dies here when the test asked for this point.
#[cfg(debug_assertions)]
pub fn reached(point: &str) {
    debug_assert!(POINTS.contains(&point), "unknown kill point {point}");
    if std::env::var_os(KILL_AT_ENV).is_some_and(|wanted| wanted == point) {
        // SAFETY: raise has no memory preconditions; SIGKILL ends this process here.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

#[cfg(not(debug_assertions))]
#[inline]
pub fn reached(_point: &str) {}
