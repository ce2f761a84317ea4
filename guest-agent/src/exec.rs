//! Running one command: chrooted into the workspace, stdio streamed over the connection
//! with back-pressure (a blocked socket stops the pipe reader, which stops the command),
//! signals from the host, and the exit status from the reaper.

use crate::init::Root;
use crate::reaper::{Reaper, Status};
use microagent_agent_protocol::frame::{read_frame, wipe, write_control, write_frame, Kind};
use microagent_agent_protocol::message::{codes, AgentMessage, ExecRequest, HostMessage, TtySize};
use std::ffi::CString;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A user from the workspace's /etc/passwd.
struct User {
    uid: u32,
    gid: u32,
    home: String,
}

fn lookup_user(root: &Path, user: Option<&str>) -> Result<User, String> {
    let name = user.unwrap_or("root");
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && (f[0] == name || f[2] == name) {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok(User {
                    uid,
                    gid,
                    home: f[5].to_owned(),
                });
            }
        }
    }
    match name.parse::<u32>() {
        Ok(uid) => Ok(User {
            uid,
            gid: uid,
            home: "/".into(),
        }),
        Err(_) if name == "root" => Ok(User {
            uid: 0,
            gid: 0,
            home: "/root".into(),
        }),
        Err(_) => Err(format!("no user {name} in the workspace's /etc/passwd")),
    }
}

fn send(writer: &Mutex<UnixStream>, message: &AgentMessage) -> bool {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    write_control(&mut *w, message).is_ok()
}

fn error(code: &str, message: String) -> AgentMessage {
    AgentMessage::Error {
        code: code.into(),
        message,
    }
}

pub fn run(
    request: ExecRequest,
    root: &Root,
    reaper: &Reaper,
    mut reader: UnixStream,
    writer: UnixStream,
) {
    let writer = Arc::new(Mutex::new(writer));
    let Some(program) = request.argv.first() else {
        send(&writer, &error(codes::BAD_REQUEST, "empty argv".into()));
        return;
    };
    let user = match lookup_user(root.path(), request.user.as_deref()) {
        Ok(user) => user,
        Err(e) => {
            send(&writer, &error(codes::EXEC_FAILED, e));
            return;
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(&request.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &user.home)
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let chroot = (root.path() != Path::new("/"))
        .then(|| CString::new(root.path().as_os_str().as_encoded_bytes()))
        .transpose();
    let cwd = CString::new(request.cwd.clone().unwrap_or_else(|| user.home.clone()));
    let (Ok(chroot), Ok(cwd)) = (chroot, cwd) else {
        send(
            &writer,
            &error(codes::BAD_REQUEST, "NUL byte in a path".into()),
        );
        return;
    };
    let (uid, gid) = (user.uid, user.gid);
    let tty = match request.tty.map(open_pty).transpose() {
        Ok(tty) => tty,
        Err(e) => {
            send(
                &writer,
                &error(codes::EXEC_FAILED, format!("allocating a terminal: {e}")),
            );
            return;
        }
    };
    let with_tty = tty.is_some();
    if let Some((_, slave)) = &tty {
        let stdio = || slave.try_clone().map(Stdio::from);
        match (stdio(), stdio(), stdio()) {
            (Ok(i), Ok(o), Ok(e)) => {
                cmd.stdin(i).stdout(o).stderr(e);
            }
            _ => {
                send(
                    &writer,
                    &error(codes::EXEC_FAILED, "duplicating the terminal".into()),
                );
                return;
            }
        }
    }
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // A terminal becomes the controlling terminal of a new session.
            if with_tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
                return Err(io::Error::last_os_error());
            }
            if let Some(root) = &chroot {
                if libc::chroot(root.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(cwd.as_ptr()) < 0 && libc::chdir(c"/".as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            let drop_root = uid != 0 || gid != 0;
            if drop_root
                && (libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawning = crate::reaper::SPAWN
        .read()
        .unwrap_or_else(|e| e.into_inner());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = match e.kind() {
                ErrorKind::NotFound => codes::NOT_FOUND,
                ErrorKind::PermissionDenied => codes::NOT_EXECUTABLE,
                _ => codes::EXEC_FAILED,
            };
            send(&writer, &error(code, format!("{program}: {e}")));
            return;
        }
    };
    let pid = child.id();
    let status = reaper.watch(pid);
    drop(spawning);
    // The parent keeps only the master side: EOF/EIO on it then means the command ended.
    drop(cmd);
    let master = tty.map(|(master, _slave)| fs::File::from(master));
    if !send(&writer, &AgentMessage::Started { pid }) {
        // SAFETY: kill of our own, not yet reaped, child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }

    let outputs: Vec<(Kind, Box<dyn Read + Send>)> = match &master {
        Some(master) => match master.try_clone() {
            Ok(m) => vec![(Kind::Stdout, Box::new(m))],
            Err(_) => Vec::new(),
        },
        None => [
            child
                .stdout
                .take()
                .map(|s| (Kind::Stdout, Box::new(s) as Box<dyn Read + Send>)),
            child
                .stderr
                .take()
                .map(|s| (Kind::Stderr, Box::new(s) as Box<dyn Read + Send>)),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    let pumps: Vec<_> = outputs
        .into_iter()
        .map(|(kind, pipe)| {
            let writer = writer.clone();
            std::thread::spawn(move || pump(pipe, kind, &writer))
        })
        .collect();

    let exited = Arc::new(AtomicBool::new(false));
    let input: Option<Box<dyn Write + Send>> = match &master {
        Some(master) => master
            .try_clone()
            .ok()
            .map(|m| Box::new(m) as Box<dyn Write + Send>),
        None => child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>),
    };
    {
        let exited = exited.clone();
        std::thread::spawn(move || feed(&mut reader, input, master, pid, &exited));
    }
    for p in pumps {
        let _ = p.join();
    }
    let message = match status.recv() {
        Ok(Status::Exited(code)) => AgentMessage::Exited {
            code: Some(code),
            signal: None,
        },
        Ok(Status::Signaled(signal)) => AgentMessage::Exited {
            code: None,
            signal: Some(signal),
        },
        Err(_) => error(codes::EXEC_FAILED, "lost the command's exit status".into()),
    };
    exited.store(true, Ordering::Release);
    send(&writer, &message);
}

/// Command output to frames until the pipe closes.
fn pump(mut pipe: Box<dyn Read + Send>, kind: Kind, writer: &Mutex<UnixStream>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        let sent = write_frame(&mut *w, kind, &buf[..n]);
        // Output may be a secret the command printed (see `frame::wipe`).
        wipe(&mut buf[..n]);
        if sent.is_err() {
            return;
        }
    }
}

/// Host frames to the command: stdin data, end of stdin, signals. A host that goes away
/// before the command ended takes the command with it.
fn feed(
    reader: &mut UnixStream,
    mut stdin: Option<Box<dyn Write + Send>>,
    tty: Option<fs::File>,
    pid: u32,
    exited: &AtomicBool,
) {
    let signal = |sig: i32| {
        if !exited.load(Ordering::Acquire) {
            // SAFETY: kill of our child, which the reaper has not reported yet.
            unsafe { libc::kill(pid as i32, sig) };
        }
    };
    loop {
        let mut frame = match read_frame(reader) {
            Ok(frame) => frame,
            Err(_) => {
                signal(libc::SIGKILL);
                return;
            }
        };
        match frame.kind {
            Kind::Stdin => {
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&frame.payload).is_err() {
                        stdin = None; // the command closed its stdin
                    }
                }
            }
            Kind::Control => match frame.parse::<HostMessage>() {
                // A terminal stays open: the command reads its end-of-input (^D) itself.
                Ok(HostMessage::CloseStdin) if tty.is_none() => stdin = None,
                Ok(HostMessage::Signal { signal: sig }) => signal(sig),
                Ok(HostMessage::Resize(size)) => {
                    if let Some(tty) = &tty {
                        set_size(tty, size);
                    }
                }
                _ => {}
            },
            Kind::Stdout | Kind::Stderr | Kind::Secret | Kind::File => {}
        }
        wipe(&mut frame.payload);
    }
}

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A pseudo-terminal pair (master, slave) of the given size.
fn open_pty(size: TtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: openpty writes two descriptors; name and termios may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let pair = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&pair.0, &pair.1] {
        // SAFETY: F_SETFD on our own descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(pair)
}

fn set_size(tty: &fs::File, size: TtySize) {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ on a terminal master with a valid winsize.
    unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}
