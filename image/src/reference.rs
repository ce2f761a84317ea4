//! Image references: `[registry/]repository[:tag][@sha256:digest]`.

use std::fmt;
use std::str::FromStr;

pub const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("image reference is empty")]
    Empty,
    #[error(
        "{reference:?}: invalid repository name {name:?} (lowercase letters, digits, . _ - /)"
    )]
    Repository { reference: String, name: String },
    #[error("{reference:?}: invalid tag {tag:?}")]
    Tag { reference: String, tag: String },
    #[error("{reference:?}: invalid digest {digest:?} (expected sha256:<64 hex digits>)")]
    Digest { reference: String, digest: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// The tag, `latest` when neither a tag nor a digest was given.
    pub fn tag_or_latest(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => Some(tag),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn valid_tag(t: &str) -> bool {
    (1..=128).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !t.starts_with(['.', '-'])
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) if valid_digest(digest) => (rest, Some(digest.to_owned())),
            Some((_, digest)) => {
                return Err(Error::Digest {
                    reference: s.into(),
                    digest: digest.into(),
                })
            }
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/' (a registry may have a port).
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag.to_owned())),
            _ => (rest, None),
        };
        if let Some(tag) = &tag {
            if !valid_tag(tag) {
                return Err(Error::Tag {
                    reference: s.into(),
                    tag: tag.clone(),
                });
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !repository.split('/').all(valid_component) {
            return Err(Error::Repository {
                reference: s.into(),
                name: repository,
            });
        }
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = self.tag_or_latest() {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn short_names_normalise_like_docker() {
        assert_eq!(parse("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(parse("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(parse("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            parse("localhost:5000/test/img:v1"),
            "localhost:5000/test/img:v1"
        );
        assert_eq!(parse("ghcr.io/o/r"), "ghcr.io/o/r:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parse(&format!("localhost:5000/img@{digest}")),
            format!("localhost:5000/img@{digest}")
        );
        let r: Reference = format!("img:1@{digest}").parse().unwrap();
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref()),
            (Some("1"), Some(digest.as_str()))
        );
    }

    #[test]
    fn malformed_references_are_refused() {
        assert_eq!("".parse::<Reference>(), Err(Error::Empty));
        assert!(matches!(
            "UPPER/case".parse::<Reference>(),
            Err(Error::Repository { .. })
        ));
        assert!(matches!(
            "img:bad tag".parse::<Reference>(),
            Err(Error::Tag { .. })
        ));
        assert!(matches!(
            "img@sha256:123".parse::<Reference>(),
            Err(Error::Digest { .. })
        ));
        assert!(matches!(
            "a//b".parse::<Reference>(),
            Err(Error::Repository { .. })
        ));
        assert!(matches!(
            "img:".parse::<Reference>(),
            Err(Error::Tag { .. })
        ));
    }
}
