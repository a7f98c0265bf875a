//! Accounts: registering users and devices, logging devices in, checking tokens, and
//! the privacy switch. Records live in the user's shard group (keyed by user id); the
//! device secret is shown once and only its SHA-256 is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_proto::v1::{ErrorCode, LoggedIn, Registered};
use rand::TryRngCore;
use sha2::{Digest, Sha256};

use crate::client_error::ClientError;
use crate::conversation::ConversationService;
use crate::messaging_state::{
    DeviceRecord, MessagingOp, MessagingQuery, MessagingResponse, QueryResult, UserRecord,
};
use crate::tokens::{Claims, TokenAuthority, TokenError};

/// Longest user or device id, bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Cached user records older than this are read again.
const USER_CACHE_TTL: Duration = Duration::from_secs(5);
const USER_CACHE_LIMIT: usize = 100_000;

/// Checks a user or device id: 1-64 bytes of `[a-z0-9_.-]`.
pub fn validate_name(field: &str, value: &str) -> Result<(), ClientError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(ClientError::invalid(format!(
            "{field} must be 1-{MAX_NAME_BYTES} bytes"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(ClientError::invalid(format!(
            "{field} may contain only a-z, 0-9, '_', '.' and '-'"
        )));
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Registration, login and token checks.
pub struct Accounts {
    log: Arc<ConversationService>,
    tokens: TokenAuthority,
    cache: Mutex<HashMap<String, (UserRecord, Instant)>>,
}

impl Accounts {
    pub fn new(log: Arc<ConversationService>, tokens: TokenAuthority) -> Arc<Accounts> {
        Arc::new(Accounts {
            log,
            tokens,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn issue(&self, user: &str, device: &str) -> Result<(String, i64), ClientError> {
        self.tokens
            .issue(user, device)
            .map_err(|e| ClientError::new(ErrorCode::Internal, e.to_string()))
    }

    /// Creates a user with its first device.
    pub async fn register(&self, user: &str, device: &str) -> Result<Registered, ClientError> {
        validate_name("user_id", user)?;
        validate_name("device_id", device)?;
        let mut raw = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut raw)
            .map_err(|e| ClientError::new(ErrorCode::Internal, e.to_string()))?;
        let secret = hex::encode(raw);
        let record = DeviceRecord {
            device_id: device.into(),
            secret_sha256: secret_hash(&secret),
            created_ms: now_ms(),
        };
        let op = MessagingOp::CreateUser {
            user: user.into(),
            device: record,
        };
        match self.log.propose(user, &op).await? {
            MessagingResponse::UserCreated => {}
            // An internal retry of our own committed attempt also lands here: the stored
            // secret is then ours.
            MessagingResponse::UserExists if self.owns_device(user, device, &secret).await => {}
            MessagingResponse::UserExists => {
                return Err(ClientError::new(
                    ErrorCode::UserExists,
                    format!("user {user} already exists"),
                ))
            }
            other => {
                return Err(ClientError::new(
                    ErrorCode::Internal,
                    format!("unexpected reply to register: {other:?}"),
                ))
            }
        }
        let (token, token_expires_at_ms) = self.issue(user, device)?;
        Ok(Registered {
            user_id: user.into(),
            device_id: device.into(),
            device_secret: secret,
            token,
            token_expires_at_ms,
        })
    }

    async fn owns_device(&self, user: &str, device: &str, secret: &str) -> bool {
        let hash = secret_hash(secret);
        matches!(self.fetch_user(user).await, Ok(Some(r))
            if r.devices.iter().any(|d| d.device_id == device && d.secret_sha256 == hash))
    }

    /// Trades a device secret for a fresh token.
    pub async fn login(
        &self,
        user: &str,
        device: &str,
        secret: &str,
    ) -> Result<LoggedIn, ClientError> {
        validate_name("user_id", user)?;
        validate_name("device_id", device)?;
        let Some(record) = self.fetch_user(user).await? else {
            return Err(ClientError::new(
                ErrorCode::UnknownUser,
                format!("no user {user}"),
            ));
        };
        let hash = secret_hash(secret);
        let ok = record
            .devices
            .iter()
            .any(|d| d.device_id == device && d.secret_sha256 == hash);
        if !ok {
            return Err(ClientError::new(
                ErrorCode::BadCredentials,
                "unknown device or wrong device secret",
            ));
        }
        let (token, token_expires_at_ms) = self.issue(user, device)?;
        Ok(LoggedIn {
            token,
            token_expires_at_ms,
        })
    }

    /// Checks a token's signature, issuer and expiry.
    pub fn authenticate(&self, token: &str) -> Result<Claims, ClientError> {
        let claims = self.tokens.verify(token).map_err(|e| match e {
            TokenError::Expired => ClientError::new(ErrorCode::TokenExpired, "token expired"),
            TokenError::Invalid(m) => ClientError::new(ErrorCode::TokenInvalid, m),
        })?;
        validate_name("token subject", &claims.sub)
            .and_then(|_| validate_name("token device", &claims.dev))
            .map_err(|e| ClientError::new(ErrorCode::TokenInvalid, e.message))?;
        Ok(claims)
    }

    /// Reads a user record from its group (linearizable) and caches it.
    pub async fn fetch_user(&self, user: &str) -> Result<Option<UserRecord>, ClientError> {
        let q = MessagingQuery::GetUser { user: user.into() };
        match self.log.query(user, &q).await? {
            QueryResult::User(Some(r)) => {
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= USER_CACHE_LIMIT {
                        c.clear();
                    }
                    c.insert(user.into(), (r.clone(), Instant::now()));
                }
                Ok(Some(r))
            }
            QueryResult::User(None) => Ok(None),
            other => Err(ClientError::new(
                ErrorCode::Internal,
                format!("unexpected reply to a user query: {other:?}"),
            )),
        }
    }

    /// A user record, from the cache when younger than a few seconds.
    pub async fn user(&self, user: &str) -> Result<Option<UserRecord>, ClientError> {
        let cached = self.cache.lock().ok().and_then(|c| {
            c.get(user)
                .filter(|(_, at)| at.elapsed() < USER_CACHE_TTL)
                .map(|(r, _)| r.clone())
        });
        match cached {
            Some(r) => Ok(Some(r)),
            None => self.fetch_user(user).await,
        }
    }

    /// Whether `user` shares read receipts (unknown users count as not sharing).
    pub async fn read_receipts(&self, user: &str) -> Result<bool, ClientError> {
        Ok(self
            .user(user)
            .await?
            .map(|r| r.read_receipts)
            .unwrap_or(false))
    }

    /// Whether `user` shares read receipts, read from the user's shard group (not the
    /// cache): for a peer whose switch may have just changed on another node.
    pub async fn read_receipts_fresh(&self, user: &str) -> Result<bool, ClientError> {
        Ok(self
            .fetch_user(user)
            .await?
            .map(|r| r.read_receipts)
            .unwrap_or(false))
    }

    /// Sets the read-receipt switch.
    pub async fn set_privacy(&self, user: &str, read_receipts: bool) -> Result<(), ClientError> {
        let op = MessagingOp::SetPrivacy {
            user: user.into(),
            read_receipts,
        };
        match self.log.propose(user, &op).await? {
            MessagingResponse::PrivacySet => {
                if let Ok(mut c) = self.cache.lock() {
                    c.remove(user);
                }
                Ok(())
            }
            MessagingResponse::UnknownUser => Err(ClientError::new(
                ErrorCode::UnknownUser,
                format!("no user {user}"),
            )),
            other => Err(ClientError::new(
                ErrorCode::Internal,
                format!("unexpected reply to set privacy: {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        validate_name("user_id", "alice.b-2_x").expect("valid");
        for bad in ["", "Alice", "a b", "a:b", "ü", &"a".repeat(65)] {
            let e = validate_name("user_id", bad).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidArgument);
        }
    }
}
