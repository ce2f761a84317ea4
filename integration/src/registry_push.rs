//! Pushing to the test registry over the distribution API directly (no skopeo): blobs
//! streamed from files, so images of any size cost the test no memory, and a generated
//! image with one large layer.

use crate::registry::Registry;
use sha2::{Digest as _, Sha256};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;

/// Bytes of the pseudo-random block the large layer's file repeats. Larger than
/// deflate's 32 KiB window, so nothing downstream can compress it much.
const BLOCK: usize = 1 << 20;

/// A blob in the registry.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub digest: String,
    pub size: u64,
}

/// What [`push_large_image`] pushed.
#[derive(Debug, Clone)]
pub struct LargeImage {
    /// `host:port/name:v1`
    pub reference: String,
    pub layer: Pushed,
    pub config: Pushed,
}

/// A response: status, headers (names lowercase) and body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&mut dyn Read, u64)>,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let length = body.as_ref().map_or(0, |(_, n)| *n);
    head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    stream.write_all(head.as_bytes())?;
    if let Some((reader, n)) = body {
        io::copy(&mut reader.take(n), &mut stream)?;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let mut body = Vec::new();
    reader.read_to_end(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn expect(response: &Response, status: u16, what: &str) {
    assert_eq!(
        response.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&response.body)
    );
}

/// Uploads `size` bytes from `reader` as the blob `digest` of repository `name`.
pub fn push_blob(registry: &Registry, name: &str, digest: &str, reader: &mut dyn Read, size: u64) {
    let addr = &registry.addr;
    let started = request(
        addr,
        "POST",
        &format!("/v2/{name}/blobs/uploads/"),
        &[],
        None,
    )
    .unwrap();
    expect(&started, 202, "starting an upload");
    let location = started.header("location").expect("upload location");
    // The registry may answer with an absolute URL: keep its path and query.
    let path = match location.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => location,
    };
    let separator = if path.contains('?') { '&' } else { '?' };
    let done = request(
        addr,
        "PUT",
        &format!("{path}{separator}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        Some((reader, size)),
    )
    .unwrap();
    expect(&done, 201, "finishing an upload");
}

/// Puts an OCI image manifest under `name:tag`.
pub fn push_manifest(registry: &Registry, name: &str, tag: &str, manifest: &[u8]) {
    let mut body = manifest;
    let put = request(
        &registry.addr,
        "PUT",
        &format!("/v2/{name}/manifests/{tag}"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        Some((&mut body, manifest.len() as u64)),
    )
    .unwrap();
    expect(&put, 201, "putting the manifest");
}

/// Hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes to `path` a gzip layer (stored blocks: no compression work) holding one file
/// `big/data` of `size` pseudo-random bytes; returns the layer blob and the tar's
/// digest (the config's diff_id).
pub fn write_large_layer(path: &Path, size: u64) -> (Pushed, String) {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let block: Vec<u8> = (0..BLOCK / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let file = io::BufWriter::with_capacity(BLOCK, fs::File::create(path).unwrap());
    let blob = Hashing {
        inner: file,
        hasher: Sha256::new(),
        len: 0,
    };
    let gzip = flate2::write::GzEncoder::new(blob, flate2::Compression::none());
    let mut tar = Hashing {
        inner: gzip,
        hasher: Sha256::new(),
        len: 0,
    };
    let dir = crate::registry::header("big/", tar::EntryType::Directory, 0o755, 0);
    tar.write_all(dir.as_bytes()).unwrap();
    let header = crate::registry::header("big/data", tar::EntryType::Regular, 0o644, size);
    tar.write_all(header.as_bytes()).unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        tar.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    let padding = (512 - size % 512) % 512;
    tar.write_all(&vec![0u8; padding as usize + 1024]).unwrap();
    let diff_id = format!("sha256:{:x}", tar.hasher.finalize());
    let mut blob = tar.inner.finish().unwrap();
    blob.flush().unwrap();
    let digest = format!("sha256:{:x}", blob.hasher.finalize());
    (
        Pushed {
            digest,
            size: blob.len,
        },
        diff_id,
    )
}

/// Pushes `name:v1`: one generated layer with a file of `size` bytes (written under
/// `dir` first, then streamed to the registry), and a config running /bin/sh.
pub fn push_large_image(dir: &Path, registry: &Registry, name: &str, size: u64) -> LargeImage {
    let layer_path = dir.join("large-layer.tar.gz");
    let (layer, diff_id) = write_large_layer(&layer_path, size);
    let mut file = fs::File::open(&layer_path).unwrap();
    push_blob(registry, name, &layer.digest, &mut file, layer.size);
    drop(file);
    fs::remove_file(&layer_path).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let config_digest = crate::registry::digest(config.as_bytes());
    push_blob(
        registry,
        name,
        &config_digest,
        &mut config.as_bytes(),
        config.len() as u64,
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        config.len(),
        layer.digest,
        layer.size
    );
    push_manifest(registry, name, "v1", manifest.as_bytes());
    LargeImage {
        reference: format!("{}/{name}:v1", registry.addr),
        layer,
        config: Pushed {
            digest: config_digest,
            size: config.len() as u64,
        },
    }
}
