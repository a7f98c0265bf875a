//! The one-shot client commands: `register`, `send`, `privacy`, and connecting as a
//! saved user.

use std::time::Duration;

use anyhow::{bail, Context as _};
use parley_client::{Client, ClientConfig, ClientError, ClientEvent, Credentials, Events};

use crate::{Context, WaitFor};

/// How long `parley send --wait` waits for the receipt.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// `parley register USER`: registers through the first endpoint that can be reached.
pub async fn register(ctx: &Context, user: &str, device: &str) -> anyhow::Result<()> {
    // Check the id can be saved before taking it on the server.
    ctx.profiles.path(user)?;
    let mut last = None;
    for endpoint in &ctx.endpoints {
        match parley_client::register(endpoint, user, device).await {
            Ok(credentials) => {
                let path = ctx.profiles.save(&credentials)?;
                println!(
                    "registered user {} with device {} (credentials saved to {})",
                    credentials.user_id,
                    credentials.device_id,
                    path.display()
                );
                return Ok(());
            }
            // Unreachable node: try the next one. Anything else is the answer.
            Err(e) if e.is_retryable() => {
                tracing::warn!(endpoint, error = %e, "cannot register through this node");
                last = Some(e);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot register {user}")),
        }
    }
    match last {
        Some(e) => Err(e).context("no node could be reached"),
        None => bail!("no endpoint given"),
    }
}

/// Connects as a saved user; with `auto_ack` off, messages that arrive are left pending
/// for the user's interactive sessions.
pub async fn connect(
    ctx: &Context,
    user: &str,
    auto_ack: bool,
) -> anyhow::Result<(Client, Events)> {
    let credentials = ctx.profiles.load(user)?;
    let config = ClientConfig {
        auto_ack,
        ..ClientConfig::new(ctx.endpoints.clone())
    };
    let (client, events) = Client::connect(config, credentials.clone())
        .await
        .with_context(|| format!("cannot connect as {user} to {}", ctx.endpoints.join(",")))?;
    save_if_refreshed(ctx, &credentials, &client)?;
    Ok((client, events))
}

/// Saves the client's credentials if its token changed since `before`.
pub fn save_if_refreshed(
    ctx: &Context,
    before: &Credentials,
    client: &Client,
) -> anyhow::Result<()> {
    let now = client.credentials();
    if now.token != before.token {
        ctx.profiles.save(&now)?;
    }
    Ok(())
}

/// `parley send`: sends one message, then optionally waits for its receipt.
pub async fn send(
    ctx: &Context,
    user: &str,
    to: &str,
    text: &str,
    wait: WaitFor,
) -> anyhow::Result<()> {
    let (client, mut events) = connect(ctx, user, false).await?;
    let result = send_and_wait(&client, &mut events, to, text, wait).await;
    client.close().await;
    result
}

async fn send_and_wait(
    client: &Client,
    events: &mut Events,
    to: &str,
    text: &str,
    wait: WaitFor,
) -> anyhow::Result<()> {
    let sent = client
        .send_text(to, text)
        .await
        .with_context(|| format!("cannot send to {to}"))?;
    println!(
        "sent seq={} conversation={}{}",
        sent.seq,
        sent.conversation_id,
        if sent.duplicate { " (duplicate)" } else { "" }
    );
    if wait == WaitFor::Sent {
        return Ok(());
    }
    let wanted = |delivered: u64, read: u64| match wait {
        WaitFor::Delivered => delivered >= sent.seq,
        _ => read >= sent.seq,
    };
    let waiting = async {
        while let Some(event) = events.recv().await {
            if let ClientEvent::Receipt(r) = event {
                if r.conversation_id == sent.conversation_id && wanted(r.delivered_seq, r.read_seq)
                {
                    return Some(r);
                }
            }
        }
        None
    };
    match tokio::time::timeout(RECEIPT_TIMEOUT, waiting).await {
        Ok(Some(r)) => {
            let what = if wait == WaitFor::Read {
                "read"
            } else {
                "delivered"
            };
            println!(
                "{what} seq={} (receipt from {}: delivered_seq={} read_seq={})",
                sent.seq, r.user_id, r.delivered_seq, r.read_seq
            );
            Ok(())
        }
        Ok(None) => bail!("the connection closed before the receipt came"),
        Err(_) if wait == WaitFor::Read => bail!(
            "no read receipt within {RECEIPT_TIMEOUT:?} (the recipient may not have read it, \
             or one of you has read receipts off)"
        ),
        Err(_) => bail!("no delivery receipt within {RECEIPT_TIMEOUT:?} (is {to} online?)"),
    }
}

/// `parley privacy`: sets whether the user sends and sees read receipts.
pub async fn privacy(ctx: &Context, user: &str, read_receipts: bool) -> anyhow::Result<()> {
    let (client, _events) = connect(ctx, user, false).await?;
    let result: Result<_, ClientError> = client.set_privacy(read_receipts).await;
    client.close().await;
    let set = result.context("cannot change privacy settings")?;
    println!(
        "read receipts {} for {user}",
        if set.read_receipts { "on" } else { "off" }
    );
    Ok(())
}
