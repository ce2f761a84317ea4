//! A real OCI registry for tests: Debian's docker-registry on a free loopback port, an
//! OCI image layout written from tar layers, and skopeo to push it.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tar::{Builder, EntryType, Header};

/// docker-registry on a free loopback port, killed on drop.
pub struct Registry {
    child: Child,
    /// host:port on loopback.
    pub addr: String,
    /// The registry's filesystem storage (tests corrupt blobs there).
    pub storage: PathBuf,
}

impl Registry {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "127.0.0.1", "")
    }

    /// A registry speaking TLS only, on 127.0.0.2 (an address microagent does not
    /// reach over plain HTTP by default), with a certificate from a fresh CA made by
    /// `openssl`; with `user`/`password` it also wants HTTP Basic. Returns the CA's
    /// PEM file too.
    pub fn start_tls(dir: &Path, login: Option<(&str, &str)>) -> (Self, PathBuf) {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=microagent test CA",
            "-days",
            "2",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.2",
        ]);
        fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.2\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        let mut extra = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        if let Some((user, password)) = login {
            extra.push_str(&htpasswd_config(dir, user, password));
        }
        (
            Self::start_with(dir, "127.0.0.2", &extra),
            dir.join("ca.crt"),
        )
    }

    /// A registry that lets only `user` with `password` in (HTTP Basic, checked
    /// against an htpasswd file with a bcrypt line, as `htpasswd -B` writes it).
    pub fn start_with_htpasswd(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_with(dir, "127.0.0.1", &htpasswd_config(dir, user, password))
    }

    /// Started on `ip` with `extra` appended to its configuration (right after the
    /// `http:` section's `addr`, so indented lines extend that section).
    fn start_with(dir: &Path, ip: &str, extra: &str) -> Self {
        let port = TcpListener::bind(format!("{ip}:0"))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("{ip}:{port}");
        let storage = dir.join("registry-data");
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{extra}",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            addr,
            storage,
        }
    }
}

/// The registry configuration for HTTP Basic against an htpasswd file (written under
/// `dir` with a bcrypt line, as `htpasswd -B` writes it).
fn htpasswd_config(dir: &Path, user: &str, password: &str) -> String {
    let file = dir.join("htpasswd");
    let hash = bcrypt::hash(password, 4).unwrap();
    fs::write(&file, format!("{user}:{hash}\n")).unwrap();
    format!(
        "auth:\n  htpasswd:\n    realm: microagent-test\n    path: {}\n",
        file.display()
    )
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let d = digest(data);
    fs::write(layout.join("blobs/sha256").join(&d[7..]), data).unwrap();
    (d, data.len())
}

/// An OCI image layout (tag v1) with the whiteout test layers, the second gzip-compressed.
pub fn write_layout(layout: &Path) {
    let (one, two) = whiteout_layers();
    write_image_layout(layout, &[(one, false), (two, true)]);
}

/// An OCI image layout (tag v1) of `layers` (uncompressed tars, bottom first), each
/// stored gzip-compressed when its flag says so; config with Env PATH=/bin, Cmd /bin/sh.
pub fn write_image_layout(layout: &Path, layers: &[(Vec<u8>, bool)]) {
    write_image_layout_with_config(layout, layers, None);
}

/// As [`write_image_layout`], with `config` as the config blob when given.
pub fn write_image_layout_with_config(
    layout: &Path,
    layers: &[(Vec<u8>, bool)],
    config: Option<&[u8]>,
) {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, gzip) in layers {
        diff_ids.push(format!("\"{}\"", digest(tar)));
        let (blob, media) = if *gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            (
                gz.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (tar.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        let (d, size) = put_blob(layout, &blob);
        descriptors.push(format!(
            r#"{{"mediaType":"{media}","digest":"{d}","size":{size}}}"#
        ));
    }
    let default_config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let (c, cs) = put_blob(layout, config.map_or(default_config.as_bytes(), |c| c));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{cs}}},"layers":[{}]}}"#,
        descriptors.join(",")
    );
    let (m, ms) = put_blob(layout, manifest.as_bytes());
    fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{ms},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#
        ),
    )
    .unwrap();
}

/// Pushes the layout's v1 to `registry` as `name` with skopeo.
pub fn push(layout: &Path, registry: &Registry, name: &str) {
    push_as(layout, registry, name, None);
}

/// [`push`] with `user:password` credentials when given.
pub fn push_as(layout: &Path, registry: &Registry, name: &str, creds: Option<&str>) {
    let mut skopeo = Command::new("skopeo");
    skopeo.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if let Some(creds) = creds {
        skopeo.arg(format!("--dest-creds={creds}"));
    }
    let out = skopeo
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/{name}", registry.addr))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn header(path: &str, kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

pub fn file(b: &mut Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    b.append(
        &header(path, EntryType::Regular, mode, data.len() as u64),
        data,
    )
    .unwrap();
}

pub fn dir(b: &mut Builder<Vec<u8>>, path: &str, mode: u32) {
    b.append(&header(path, EntryType::Directory, mode, 0), &[][..])
        .unwrap();
}

pub fn link(b: &mut Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
    let mut h = header(path, kind, 0o777, 0);
    h.set_link_name(target).unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

/// Two layers of a busybox-static image: the second deletes a file and replaces a
/// directory's contents.
pub fn whiteout_layers() -> (Vec<u8>, Vec<u8>) {
    let busybox = fs::read(crate::initramfs::BUSYBOX).expect("busybox-static is installed");
    let mut one = Builder::new(Vec::new());
    dir(&mut one, "bin/", 0o755);
    file(&mut one, "bin/busybox", 0o755, &busybox);
    file(&mut one, "bin/tool", 0o755, b"#!/bin/sh\necho tool\n");
    dir(&mut one, "etc/", 0o755);
    file(&mut one, "etc/old.conf", 0o644, b"old\n");
    file(&mut one, "etc/keep.conf", 0o600, b"keep\n");
    dir(&mut one, "data/", 0o750);
    file(&mut one, "data/a", 0o644, b"a\n");
    file(&mut one, "data/b", 0o644, b"b\n");
    link(&mut one, EntryType::Symlink, "bin/sh", "tool");
    link(&mut one, EntryType::Link, "bin/tool-hard", "bin/tool");
    let one = one.into_inner().unwrap();

    let mut two = Builder::new(Vec::new());
    file(&mut two, "etc/.wh.old.conf", 0o644, b"");
    dir(&mut two, "data/", 0o750);
    file(&mut two, "data/.wh..wh..opq", 0o644, b"");
    file(&mut two, "data/c", 0o640, b"c\n");
    let two = two.into_inner().unwrap();
    (one, two)
}

/// Applets of the workspace test image besides the agent rig's ([`crate::agent::APPLETS`]);
/// all are symlinks to busybox in /bin.
const MORE_APPLETS: &[&str] = &[
    "nc", "nslookup", "grep", "seq", "date", "test", "[", "printf", "ps", "nproc", "df", "mount",
    "uname",
];

/// One layer of a small workspace image: busybox-static with its applets in /bin, a root
/// and an `app` user (uid 1000), and the usual empty directories.
pub fn workspace_layer() -> Vec<u8> {
    let busybox = fs::read(crate::initramfs::BUSYBOX).expect("busybox-static is installed");
    let mut b = Builder::new(Vec::new());
    for d in [
        "bin/", "etc/", "root/", "home/", "tmp/", "proc/", "sys/", "dev/", "run/",
    ] {
        dir(&mut b, d, if d == "tmp/" { 0o1777 } else { 0o755 });
    }
    dir(&mut b, "home/app/", 0o755);
    file(&mut b, "bin/busybox", 0o755, &busybox);
    for applet in crate::agent::APPLETS.iter().chain(MORE_APPLETS) {
        link(
            &mut b,
            EntryType::Symlink,
            &format!("bin/{applet}"),
            "busybox",
        );
    }
    file(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    );
    file(&mut b, "etc/group", 0o644, b"root:x:0:\napp:x:1000:\n");
    b.into_inner().unwrap()
}

/// Pushes a workspace image ([`workspace_layer`], gzip) to `registry` as `name` and
/// returns its reference.
pub fn push_workspace_image(dir: &Path, registry: &Registry, name: &str) -> String {
    let layout = dir.join("workspace-layout");
    write_image_layout(&layout, &[(workspace_layer(), true)]);
    push(&layout, registry, name);
    format!("{}/{name}", registry.addr)
}

/// A layout whose tag v1 is an index of an arm64 and an amd64 image (each one layer
/// with a file `arch-<arch>`); returns the amd64 manifest's digest.
pub fn write_multi_arch_layout(layout: &Path) -> String {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let put = |data: &[u8]| {
        let d = digest(data);
        fs::write(layout.join("blobs/sha256").join(&d[7..]), data).unwrap();
        (d, data.len())
    };
    let mut manifests = Vec::new();
    let mut amd64 = String::new();
    for arch in ["arm64", "amd64"] {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path(format!("arch-{arch}")).unwrap();
        h.set_size(arch.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append(&h, arch.as_bytes()).unwrap();
        let layer = tar.into_inner().unwrap();
        let (l, ls) = put(&layer);
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{l}"]}}}}"#
        );
        let (c, cs) = put(config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{ls}}}]}}"#
        );
        let (m, ms) = put(manifest.as_bytes());
        if arch == "amd64" {
            amd64 = m.clone();
        }
        manifests.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{ms},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        ));
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        manifests.join(",")
    );
    let (i, is) = put(index.as_bytes());
    fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{i}","size":{is},"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#
        ),
    )
    .unwrap();
    amd64
}
