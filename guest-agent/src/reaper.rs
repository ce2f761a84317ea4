//! PID 1 reaps every process. One thread owns `waitpid(-1)`; an exec registers its child
//! and receives that child's status, everything else (orphans) is simply reaped.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
            let mut raw = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
            if pid < 0 {
                // No children right now (ECHILD) or interrupted: look again shortly.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let status = if libc::WIFSIGNALED(raw) {
                Status::Signaled(libc::WTERMSIG(raw))
            } else if libc::WIFEXITED(raw) {
                Status::Exited(libc::WEXITSTATUS(raw))
            } else {
                continue; // stopped/continued: not an end
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
