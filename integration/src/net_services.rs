//! Host services for network tests, on loopback, each in a thread that ends with the
//! test process: an HTTP server for one blob, a TCP sink that answers with the sha256 of
//! what it read, and a DNS responder with one A record.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// Deterministic test data.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves `body` for any GET, HTTP/1.0 style (one request per connection). Returns the
/// address.
pub fn http_server(body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the HTTP server");
    let addr = listener.local_addr().expect("HTTP server address");
    let body = Arc::new(body);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = body.clone();
            thread::spawn(move || serve_get(stream, &body));
        }
    });
    addr
}

fn serve_get(mut stream: TcpStream, body: &[u8]) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let mut request = Vec::new();
    let mut byte = [0u8];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 8192 {
        match stream.read(&mut byte) {
            Ok(1) => request.push(byte[0]),
            _ => return,
        }
    }
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

/// Reads each connection to EOF and answers `<bytes> <sha256 hex>\n`.
pub fn sha_sink() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the sink");
    let addr = listener.local_addr().expect("sink address");
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                let mut hasher = Sha256::new();
                let mut total = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            total += n;
                        }
                        Err(_) => return,
                    }
                }
                let hex: String = hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let _ = writeln!(stream, "{total} {hex}");
            });
        }
    });
    addr
}

/// Answers A queries for `name` with `ip`; other names get NXDOMAIN, other types no
/// answer. Returns the address.
pub fn dns_server(name: &'static str, ip: Ipv4Addr) -> SocketAddr {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the DNS server");
    let addr = socket.local_addr().expect("DNS server address");
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if let Some(reply) = dns_reply(&buf[..n], name, ip) {
                let _ = socket.send_to(&reply, from);
            }
        }
    });
    addr
}

fn dns_reply(query: &[u8], name: &str, ip: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let known = labels.join(".") == name;
    let answer = known && qtype == 1;
    let mut reply = Vec::new();
    reply.extend_from_slice(&query[..2]);
    // Response, recursion desired and available; NXDOMAIN for unknown names.
    reply.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&u16::from(answer).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if answer {
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}
