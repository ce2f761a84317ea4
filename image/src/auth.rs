//! Registry credentials, kept the way Docker keeps them: `$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`, with the base64 `user:password` under
//! `auths.<registry>.auth` (Docker Hub's key is `https://index.docker.io/v1/`). Pulls
//! read them ([`for_registry`]); `microagent image login/logout` write them ([`login`],
//! [`logout`]) with mode 0600, replaced by a rename so a reader never sees half a file,
//! every other key kept. Anonymous access (with the registry's bearer-token dance) when
//! there is none.

use crate::tls::CaCert;
use oci_client::secrets::RegistryAuth;
use serde_json::Value;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The key Docker uses for Docker Hub.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Docker config location: set DOCKER_CONFIG or HOME")]
    NoConfigDir,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a JSON object ({why}); fix or move it, then log in again")]
    BadConfig { path: PathBuf, why: String },
    #[error(
        "registry {registry} refused the credentials of {user} (check the user name and password)"
    )]
    Unauthorized { registry: String, user: String },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("starting the network runtime: {0}")]
    Runtime(io::Error),
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoConfigDir | Self::Io { .. } => "image.credentials_unwritable",
            Self::BadConfig { .. } => "image.bad_credentials_file",
            Self::Unauthorized { .. } => "image.unauthorized",
            Self::Registry { .. } => "image.login_failed",
            Self::Runtime(_) => "host.runtime_failed",
        }
    }
}

/// Where credentials are read from and written to.
pub fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The key `registry` is stored under.
fn key(registry: &str) -> String {
    if registry == crate::reference::DOCKER_HUB {
        DOCKER_HUB_KEY.to_owned()
    } else {
        registry.to_owned()
    }
}

/// Credentials for `registry` from a Docker config document.
pub fn from_config(config: &Value, registry: &str) -> Option<(String, String)> {
    let auths = config["auths"].as_object()?;
    let keys = [
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    let entry = keys.iter().find_map(|k| auths.get(k)).or_else(|| {
        (registry == crate::reference::DOCKER_HUB)
            .then(|| auths.get(DOCKER_HUB_KEY))
            .flatten()
    })?;
    let decoded = decode_base64(entry["auth"].as_str()?)?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// What to present to `registry`.
pub fn for_registry(registry: &str) -> RegistryAuth {
    let config = config_path()
        .and_then(|p| fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    match config.and_then(|c| from_config(&c, registry)) {
        Some((user, password)) => RegistryAuth::Basic(user, password),
        None => RegistryAuth::Anonymous,
    }
}

/// The config document at `path` (an empty object when there is no file).
fn read_config(path: &Path) -> Result<serde_json::Map<String, Value>, Error> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let bad = |why: String| Error::BadConfig {
        path: path.to_owned(),
        why,
    };
    match serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))? {
        Value::Object(map) => Ok(map),
        _ => Err(bad("it is JSON, but not an object".into())),
    }
}

/// Writes `config` to `path` with mode 0600 through a temporary file and a rename.
fn write_config(path: &Path, config: &serde_json::Map<String, Value>) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let dir = path.parent().ok_or(Error::NoConfigDir)?;
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    let tmp = dir.join(format!(".config.json.tmp-{}", std::process::id()));
    let text = serde_json::to_vec_pretty(config).unwrap_or_default();
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            // The mode of an existing temporary file is not changed by open.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&text)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io(path))
}

/// Stores credentials for `registry`; returns the file written.
pub fn store(registry: &str, user: &str, password: &str) -> Result<PathBuf, Error> {
    let path = config_path().ok_or(Error::NoConfigDir)?;
    let mut config = read_config(&path)?;
    let auths = config
        .entry("auths")
        .or_insert_with(|| Value::Object(Default::default()));
    if !auths.is_object() {
        *auths = Value::Object(Default::default());
    }
    if let Value::Object(auths) = auths {
        auths.insert(
            key(registry),
            serde_json::json!({ "auth": encode_base64(format!("{user}:{password}").as_bytes()) }),
        );
    }
    write_config(&path, &config)?;
    Ok(path)
}

/// Forgets the credentials for `registry`; `false` when there were none.
pub fn logout(registry: &str) -> Result<bool, Error> {
    let path = config_path().ok_or(Error::NoConfigDir)?;
    let mut config = read_config(&path)?;
    let Some(Value::Object(auths)) = config.get_mut("auths") else {
        return Ok(false);
    };
    let keys = [
        key(registry),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    let removed = keys.iter().filter(|k| auths.remove(*k).is_some()).count() > 0;
    if removed {
        write_config(&path, &config)?;
    }
    Ok(removed)
}

/// Checks `user`/`password` against `registry` the way `docker login` does (the API
/// root with HTTP Basic, or the token service its bearer challenge names), then stores
/// them. Plain HTTP when `plain`. Nothing is stored when the registry refuses them.
pub fn login(
    registry: &str,
    user: &str,
    password: &str,
    plain: bool,
    ca_certs: &[CaCert],
) -> Result<PathBuf, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(check(registry, user, password, plain, ca_certs))?;
    store(registry, user, password)
}

async fn check(
    registry: &str,
    user: &str,
    password: &str,
    plain: bool,
    ca_certs: &[CaCert],
) -> Result<(), Error> {
    let failed = |message: String| Error::Registry {
        registry: registry.to_owned(),
        message,
    };
    let mut builder = reqwest::Client::builder();
    for ca in ca_certs {
        let cert = reqwest::Certificate::from_pem(&ca.pem)
            .map_err(|e| failed(format!("{}: {e}", ca.path.display())))?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| failed(e.to_string()))?;
    let host = if registry == crate::reference::DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        registry
    };
    let url = format!("{}://{host}/v2/", if plain { "http" } else { "https" });
    let anonymous = client
        .get(&url)
        .send()
        .await
        .map_err(|e| failed(crate::pull::describe(&e)))?;
    let challenge = anonymous
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let answer = match bearer_challenge(&challenge) {
        Some((realm, service)) => {
            let mut request = client.get(realm);
            if let Some(service) = service {
                request = request.query(&[("service", service)]);
            }
            request.basic_auth(user, Some(password)).send().await
        }
        None => {
            client
                .get(&url)
                .basic_auth(user, Some(password))
                .send()
                .await
        }
    }
    .map_err(|e| failed(crate::pull::describe(&e)))?;
    match answer.status() {
        s if s.is_success() => Ok(()),
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
            Err(Error::Unauthorized {
                registry: registry.to_owned(),
                user: user.to_owned(),
            })
        }
        s => Err(failed(format!("{url} answered {s}"))),
    }
}

/// `realm` and `service` of a `Bearer realm="…",service="…"` challenge.
fn bearer_challenge(header: &str) -> Option<(String, Option<String>)> {
    let params = header.strip_prefix("Bearer ")?;
    let mut realm = None;
    let mut service = None;
    for part in params.split(',') {
        let Some((name, value)) = part.trim().split_once('=') else {
            continue;
        };
        let value = value.trim_matches('"').to_owned();
        match name {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {}
        }
    }
    Some((realm?, service))
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn encode_base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let mut acc = 0u32;
        for (i, &b) in chunk.iter().enumerate() {
            acc |= u32::from(b) << (16 - 8 * i);
        }
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(acc >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (with or without padding).
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|&b| b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_by_registry_and_decoded() {
        // "alice:s3cret" and "bob:pw" in base64.
        let config = serde_json::json!({"auths": {
            "registry.example.com": {"auth": "YWxpY2U6czNjcmV0"},
            "https://index.docker.io/v1/": {"auth": "Ym9iOnB3"},
        }});
        assert_eq!(
            from_config(&config, "registry.example.com"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(
            from_config(&config, "docker.io"),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(from_config(&config, "other.example.com"), None);
        assert_eq!(decode_base64("aGk="), Some(b"hi".to_vec()));
        assert_eq!(decode_base64("a"), None);
        assert_eq!(decode_base64("!!!!"), None);
    }

    #[test]
    fn encoding_round_trips_and_matches_docker() {
        assert_eq!(encode_base64(b"alice:s3cret"), "YWxpY2U6czNjcmV0");
        assert_eq!(encode_base64(b"hi"), "aGk=");
        assert_eq!(encode_base64(b"h"), "aA==");
        for text in ["", "a", "ab", "abc", "user:pä:ss"] {
            assert_eq!(
                decode_base64(&encode_base64(text.as_bytes())).unwrap(),
                text.as_bytes()
            );
        }
    }

    #[test]
    fn bearer_challenges_name_their_token_service() {
        assert_eq!(
            bearer_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#
            ),
            Some((
                "https://auth.docker.io/token".into(),
                Some("registry.docker.io".into())
            ))
        );
        assert_eq!(bearer_challenge(r#"Basic realm="registry""#), None);
    }
}
