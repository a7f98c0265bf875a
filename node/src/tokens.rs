//! Client tokens: EdDSA-signed JWTs (issuer `parley`, `sub` = user id, `dev` = device
//! id, `exp`). Every node holds the same Ed25519 key (a PKCS#8 PEM file; in Kubernetes a
//! Secret), so a token issued by one node is accepted by all. Signing and checking are
//! `jsonwebtoken`'s; key generation is `ed25519-dalek`'s over OS randomness.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::TryRngCore;
use serde::{Deserialize, Serialize};

const ISSUER: &str = "parley";

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// User id.
    pub sub: String,
    /// Device id.
    pub dev: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Why a signing key could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading token key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token key {path} is not an Ed25519 PKCS#8 PEM private key: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// Issues and checks client tokens.
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TokenAuthority {
    /// Loads the signing key from a PEM file.
    pub fn from_pem_file(path: &Path, ttl: Duration) -> Result<TokenAuthority, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_pem(&pem, ttl).map_err(|reason| KeyError::Parse {
            path: path.into(),
            reason,
        })
    }

    /// Builds an authority from an Ed25519 PKCS#8 PEM private key.
    pub fn from_pem(pem: &str, ttl: Duration) -> Result<TokenAuthority, String> {
        let signing = SigningKey::from_pkcs8_pem(pem).map_err(|e| e.to_string())?;
        let public = signing
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| e.to_string())?;
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let decoding = DecodingKey::from_ed_pem(public.as_bytes()).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 0;
        Ok(TokenAuthority {
            encoding,
            decoding,
            validation,
            ttl,
        })
    }

    /// A token for `user`'s `device`, valid for the configured lifetime, and its expiry
    /// in milliseconds since the epoch.
    pub fn issue(&self, user: &str, device: &str) -> Result<(String, i64), TokenError> {
        let iat = now_secs();
        self.issue_at(user, device, iat, iat + self.ttl.as_secs() as i64)
    }

    /// A token with explicit times (tests mint expired ones with it).
    pub fn issue_at(
        &self,
        user: &str,
        device: &str,
        iat: i64,
        exp: i64,
    ) -> Result<(String, i64), TokenError> {
        let claims = Claims {
            iss: ISSUER.into(),
            sub: user.into(),
            dev: device.into(),
            iat,
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        Ok((token, exp.saturating_mul(1000)))
    }

    /// Checks signature, issuer and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Err(TokenError::Expired),
                _ => Err(TokenError::Invalid(e.to_string())),
            },
        }
    }
}

/// A new Ed25519 private key as PKCS#8 PEM.
pub fn new_key_pem() -> std::io::Result<String> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(std::io::Error::other)?;
    let pem = SigningKey::from_bytes(&seed)
        .to_pkcs8_pem(Default::default())
        .map_err(std::io::Error::other)?;
    Ok(pem.to_string())
}

/// Writes a new key to `path` (mode 0600); an existing file is never overwritten.
pub fn write_new_key(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let pem = new_key_pem()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> TokenAuthority {
        TokenAuthority::from_pem(&new_key_pem().expect("key"), Duration::from_secs(60))
            .expect("authority")
    }

    #[test]
    fn issued_tokens_verify() {
        let a = authority();
        let (token, exp_ms) = a.issue("alice", "phone").expect("issue");
        let c = a.verify(&token).expect("verify");
        assert_eq!((c.sub.as_str(), c.dev.as_str()), ("alice", "phone"));
        assert_eq!(c.exp * 1000, exp_ms);
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_refused() {
        let a = authority();
        let now = now_secs();
        let (old, _) = a
            .issue_at("alice", "phone", now - 120, now - 60)
            .expect("issue");
        assert_eq!(a.verify(&old), Err(TokenError::Expired));
        // Signed by another key.
        let (forged, _) = authority().issue("alice", "phone").expect("issue");
        assert!(matches!(a.verify(&forged), Err(TokenError::Invalid(_))));
        for junk in ["", "a.b.c", "not a token", "\u{0}\u{1}"] {
            assert!(matches!(a.verify(junk), Err(TokenError::Invalid(_))));
        }
    }

    #[test]
    fn key_files_are_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        write_new_key(&path).expect("write");
        assert!(write_new_key(&path).is_err());
        TokenAuthority::from_pem_file(&path, Duration::from_secs(1)).expect("load");
        std::fs::write(&path, "junk").expect("write");
        assert!(matches!(
            TokenAuthority::from_pem_file(&path, Duration::from_secs(1)),
            Err(KeyError::Parse { .. })
        ));
    }
}
