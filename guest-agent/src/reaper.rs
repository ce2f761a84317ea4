//! PID 1 reaps every process. One thread waits for any child to end; an exec registers
//! its child and receives that child's status, everything else (orphans) is simply
//! reaped.
//!
//! `std::process::Command::spawn` reaps its own child when the exec fails, so the reaper
//! must not take a child from under a spawn in progress: it only peeks (WNOWAIT), then
//! reaps that one pid while holding [`SPAWN`] exclusively; spawns hold it shared.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Held (shared) across `spawn` and [`Reaper::watch`] by every exec.
pub static SPAWN: RwLock<()> = RwLock::new(());

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
}

#[derive(Default)]
struct Table {
    waiting: HashMap<u32, Sender<Status>>,
    /// Statuses of children that ended before their exec registered them.
    early: HashMap<u32, Status>,
}

#[derive(Clone)]
pub struct Reaper(Arc<Mutex<Table>>);

impl Reaper {
    pub fn start() -> Self {
        let reaper = Self(Arc::new(Mutex::new(Table::default())));
        let table = reaper.0.clone();
        std::thread::spawn(move || loop {
            // SAFETY: an all-zero siginfo_t is valid for waitid to fill.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid siginfo pointer; WNOWAIT leaves the child.
            let ret =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if ret < 0 {
                // No children right now (ECHILD) or interrupted: look again shortly.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // SAFETY: waitid filled a CLD_* siginfo, whose si_pid is valid.
            let pid = unsafe { info.si_pid() };
            let _no_spawn = SPAWN.write().unwrap_or_else(|e| e.into_inner());
            let mut raw = 0;
            // SAFETY: waitpid for one pid with a valid status pointer.
            if unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) } != pid {
                continue; // a failed spawn already reaped it
            }
            let status = if libc::WIFSIGNALED(raw) {
                Status::Signaled(libc::WTERMSIG(raw))
            } else {
                Status::Exited(libc::WEXITSTATUS(raw))
            };
            let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
            match t.waiting.remove(&(pid as u32)) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => {
                    // An orphan, or an exec child not registered yet.
                    t.early.insert(pid as u32, status);
                    if t.early.len() > 4096 {
                        t.early.clear(); // orphans nobody will ask about
                    }
                }
            }
        });
        reaper
    }

    /// The status of `pid` will be sent to the returned receiver.
    pub fn watch(&self, pid: u32) -> Receiver<Status> {
        let (tx, rx) = channel();
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match t.early.remove(&pid) {
            Some(status) => {
                let _ = tx.send(status);
            }
            None => {
                t.waiting.insert(pid, tx);
            }
        }
        rx
    }
}
