//! Accounts: [`Credentials`], and [`register`] / [`login`] on a short-lived connection.

use std::time::Duration;

use parley_proto::v1::{client_frame, reply, Register};
use serde::{Deserialize, Serialize};

use crate::connection::Connection;
use crate::error::ClientError;
use crate::frame::result_name;

/// How long [`register`] and [`login`] wait for the connection and for the answer.
pub const ACCOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a device needs to connect: its ids, its secret and the current token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The user id.
    pub user_id: String,
    /// This device's id.
    pub device_id: String,
    /// The device secret returned once by `Register`; trades for fresh tokens.
    pub device_secret: String,
    /// The current token (`Authenticate`).
    pub token: String,
    /// When the token expires, Unix milliseconds.
    pub token_expires_at_ms: i64,
}

/// Registers a new user with its first device through the node at `endpoint`
/// (host:port of its client port) and returns the device's credentials.
pub async fn register(
    endpoint: &str,
    user_id: &str,
    device_id: &str,
) -> Result<Credentials, ClientError> {
    let mut conn = Connection::open(endpoint, 1, ACCOUNT_TIMEOUT).await?;
    let body = client_frame::Body::Register(Register {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
    });
    let result = conn.call(body, ACCOUNT_TIMEOUT).await;
    conn.close().await;
    match result? {
        Some(reply::Result::Registered(r)) => Ok(Credentials {
            user_id: r.user_id,
            device_id: r.device_id,
            device_secret: r.device_secret,
            token: r.token,
            token_expires_at_ms: r.token_expires_at_ms,
        }),
        other => Err(ClientError::UnexpectedReply {
            request: "Register",
            got: result_name(&other),
        }),
    }
}

/// Logs a known device in through the node at `endpoint` and returns its credentials
/// with a fresh token.
pub async fn login(
    endpoint: &str,
    user_id: &str,
    device_id: &str,
    device_secret: &str,
) -> Result<Credentials, ClientError> {
    let mut conn = Connection::open(endpoint, 1, ACCOUNT_TIMEOUT).await?;
    let result = conn
        .login(user_id, device_id, device_secret, ACCOUNT_TIMEOUT)
        .await;
    conn.close().await;
    let logged_in = result?;
    Ok(Credentials {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        device_secret: device_secret.to_owned(),
        token: logged_in.token,
        token_expires_at_ms: logged_in.token_expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_serialize_as_plain_json() {
        let c = Credentials {
            user_id: "alice".into(),
            device_id: "cli".into(),
            device_secret: "s3cret".into(),
            token: "t".into(),
            token_expires_at_ms: 1_700_000_000_000,
        };
        let json = serde_json::to_string(&c).expect("serializes");
        assert!(json.contains("\"user_id\":\"alice\""));
        assert!(json.contains("\"token_expires_at_ms\":1700000000000"));
        let back: Credentials = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, c);
    }
}
