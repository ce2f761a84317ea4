//! Image platforms (`linux/amd64`, `linux/arm64/v8`): which manifest of an index a
//! pull picks (`--platform`), and what `image list` shows.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "platform {0:?} is not OS/ARCHITECTURE[/VARIANT] (examples: linux/amd64, linux/arm64/v8)"
    )]
    Malformed(String),
}

impl Error {
    pub fn code(&self) -> &'static str {
        "input.bad_platform"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// The platform workspaces run on: linux/amd64.
impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// Whether an image of `os`/`architecture`/`variant` is this platform (a variant
    /// is compared only when this platform names one).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self
                .variant
                .as_deref()
                .is_none_or(|wanted| variant == Some(wanted))
    }

    /// The platform an image config (or an index entry's `platform`) names, if any.
    pub fn of_json(value: &serde_json::Value) -> Option<Self> {
        let text = |key: &str| value[key].as_str().filter(|s| !s.is_empty());
        Some(Self {
            os: text("os")?.to_owned(),
            architecture: text("architecture")?.to_owned(),
            variant: text("variant").map(str::to_owned),
        })
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let parts: Vec<&str> = text.split('/').collect();
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| part_ok(p)) {
            return Err(Error::Malformed(text.into()));
        }
        Ok(Self {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_print_and_match_with_optional_variants() {
        let arm: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(arm.to_string(), "linux/arm64");
        assert!(arm.matches("linux", "arm64", Some("v8")));
        assert!(!arm.matches("linux", "amd64", None));
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(v7.matches("linux", "arm", Some("v7")));
        assert!(!v7.matches("linux", "arm", Some("v6")));
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        for bad in [
            "",
            "linux",
            "linux/",
            "Linux/amd64",
            "linux/amd64/v8/x",
            "a b/c",
        ] {
            assert_eq!(
                bad.parse::<Platform>().unwrap_err().code(),
                "input.bad_platform",
                "{bad:?}"
            );
        }
        let config = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert_eq!(
            Platform::of_json(&config).unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert_eq!(Platform::of_json(&serde_json::json!({"os": "linux"})), None);
    }
}
