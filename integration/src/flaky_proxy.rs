//! A loopback HTTP proxy in front of the test registry that can break one blob's
//! download the way networks do: the connection stalls, or drops, after some bytes. It
//! records every `Range` header it forwards, so a test sees whether a pull resumed.
//! Each connection carries one request (`Connection: close` is forced upstream).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// What happens to responses for one blob's GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Everything goes through.
    Pass,
    /// After `after` body bytes of blob `digest`, nothing more is sent (the connection
    /// stays open until the proxy is dropped).
    Stall { digest: String, after: u64 },
    /// After `after` body bytes of blob `digest`, the connection is closed.
    Cut { digest: String, after: u64 },
    /// After `after` body bytes of blob `digest`, nothing more is sent until the file
    /// `until_gone` is removed; then the rest follows (a test acts in between).
    Hold {
        digest: String,
        after: u64,
        until_gone: std::path::PathBuf,
    },
}

#[derive(Default)]
struct Shared {
    mode: Mutex<Option<Mode>>,
    /// (request line, Range header) of every request that had one.
    ranges: Mutex<Vec<(String, String)>>,
    stop: AtomicBool,
}

/// The proxy, stopped when dropped.
pub struct FlakyProxy {
    /// host:port on loopback.
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FlakyProxy {
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared::default());
        *shared.mode.lock().unwrap() = Some(Mode::Pass);
        let (state, upstream) = (shared.clone(), upstream.to_owned());
        let accept = thread::spawn(move || {
            while !state.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (state, upstream) = (state.clone(), upstream.clone());
                        thread::spawn(move || {
                            let _ = serve(&state, client, &upstream);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    /// The `Range` headers forwarded so far in requests for blob `digest`.
    pub fn ranges_of(&self, digest: &str) -> Vec<String> {
        let blob = format!("/blobs/{digest} ");
        self.shared
            .ranges
            .lock()
            .unwrap()
            .iter()
            .filter(|(request, _)| request.contains(&blob))
            .map(|(_, range)| range.clone())
            .collect()
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Reads an HTTP head (up to the empty line) as lines.
fn read_head(reader: &mut impl BufRead) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn serve(shared: &Shared, client: TcpStream, upstream: &str) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let head = read_head(&mut from_client)?;
    let request_line = head.first().cloned().unwrap_or_default();
    if let Some(range) = header(&head, "range") {
        shared
            .ranges
            .lock()
            .unwrap()
            .push((request_line.clone(), range.to_owned()));
    }
    let length: u64 = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut server = TcpStream::connect(upstream)?;
    let mut forwarded = String::new();
    for line in &head {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    server.write_all(forwarded.as_bytes())?;
    io::copy(&mut (&mut from_client).take(length), &mut server)?;

    let mut from_server = BufReader::new(server);
    let response = read_head(&mut from_server)?;
    let mut client = client;
    let mut out = response.join("\r\n");
    out.push_str("\r\n\r\n");
    client.write_all(out.as_bytes())?;
    let mode = shared.mode.lock().unwrap().clone().unwrap_or(Mode::Pass);
    let is_get_of = |digest: &str| {
        request_line.starts_with("GET ") && request_line.contains(&format!("/blobs/{digest}"))
    };
    match mode {
        Mode::Stall { digest, after } if is_get_of(&digest) => {
            io::copy(&mut (&mut from_server).take(after), &mut client)?;
            client.flush()?;
            while !shared.stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Mode::Hold {
            digest,
            after,
            until_gone,
        } if is_get_of(&digest) => {
            io::copy(&mut (&mut from_server).take(after), &mut client)?;
            client.flush()?;
            while until_gone.exists() && !shared.stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(20));
            }
            io::copy(&mut from_server, &mut client)?;
        }
        Mode::Cut { digest, after } if is_get_of(&digest) => {
            io::copy(&mut (&mut from_server).take(after), &mut client)?;
            client.flush()?;
            client.shutdown(Shutdown::Both)?;
        }
        _ => {
            io::copy(&mut from_server, &mut client)?;
        }
    }
    Ok(())
}
