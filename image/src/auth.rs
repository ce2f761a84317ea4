//! Registry credentials from Docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`): the base64 `user:password` under `auths.<registry>.auth`.
//! Anonymous access (with the registry's bearer-token dance) when there is none.

use oci_client::secrets::RegistryAuth;
use serde_json::Value;
use std::path::PathBuf;

/// The key Docker uses for Docker Hub.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

fn config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
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
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    match config.and_then(|c| from_config(&c, registry)) {
        Some((user, password)) => RegistryAuth::Basic(user, password),
        None => RegistryAuth::Anonymous,
    }
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
}
