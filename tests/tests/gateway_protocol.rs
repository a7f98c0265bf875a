//! The client protocol at the frame level, against 3 real nodes: the handshake, every
//! documented error for bad input, limits, proxying to the home node, and a stream of
//! random and truncated frames that must not take a node down.

use std::time::Duration;

use parley_proto::v1::{
    client_frame::Body, event, reply, Ack, Authenticate, ErrorCode, Fetch, Login, MarkRead, Ping,
    Register, Send, SetPrivacy, Sync,
};
use parley_testkit::{ClusterOptions, LocalCluster, RawConnection, Received, ServerError};
use prost::Message as _;
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(30);

fn code(e: &parley_proto::v1::Error) -> ErrorCode {
    ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified)
}

/// Registers `user` through `addr`; returns (token, device secret).
async fn register(addr: &str, user: &str) -> anyhow::Result<(String, String)> {
    let mut c = RawConnection::connect(addr).await?;
    let (r, _) = c
        .call(Body::Register(Register {
            user_id: user.into(),
            device_id: "phone".into(),
        }))
        .await?;
    match r
        .map_err(|e| anyhow::anyhow!("register {user}: {e:?}"))?
        .result
    {
        Some(reply::Result::Registered(r)) => Ok((r.token, r.device_secret)),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// An authenticated connection; returns it and the home node it reports.
async fn login(addr: &str, token: &str) -> anyhow::Result<(RawConnection, u64)> {
    let mut c = RawConnection::connect(addr).await?;
    let (r, _) = c
        .call(Body::Authenticate(Authenticate {
            token: token.into(),
        }))
        .await?;
    match r
        .map_err(|e| anyhow::anyhow!("authenticate: {e:?}"))?
        .result
    {
        Some(reply::Result::Authenticated(a)) => Ok((c, a.home_node)),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

async fn expect_error(
    c: &mut RawConnection,
    body: Body,
    want: ErrorCode,
) -> anyhow::Result<String> {
    let (r, _) = c.call(body).await?;
    match r {
        Err(ServerError(e)) => {
            assert_eq!(code(&e), want, "{}", e.message);
            Ok(e.message)
        }
        Ok(r) => anyhow::bail!("expected {want:?}, got {r:?}"),
    }
}

fn send(id: &str, to: &str, body: &[u8]) -> Body {
    Body::Send(Send {
        client_msg_id: id.into(),
        recipient: to.into(),
        body: body.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_messages_receipts_and_privacy_at_the_frame_level() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterOptions::default()).await?;
    let eps = cluster.client_endpoints();
    let (alice_token, _) = register(&eps[0], "alice").await?;
    let (bob_token, _) = register(&eps[1], "bob").await?;
    let (mut alice, _) = login(&eps[2], &alice_token).await?;
    let (mut bob, _) = login(&eps[0], &bob_token).await?;
    let (r, _) = bob.call(Body::Sync(Sync {})).await?;
    assert!(matches!(r?.result, Some(reply::Result::SyncComplete(_))));

    for i in 1..=3u64 {
        let (r, _) = alice
            .call(send(
                &format!("m{i}"),
                "bob",
                format!("hello {i}").as_bytes(),
            ))
            .await?;
        match r.map_err(|e| anyhow::anyhow!("{e:?}"))?.result {
            Some(reply::Result::Sent(s)) => {
                assert_eq!(
                    (s.conversation_id.as_str(), s.seq, s.duplicate),
                    ("dm:alice:bob", i, false)
                )
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // Real time, in order.
    for i in 1..=3u64 {
        match bob.recv(T).await? {
            Received::Event(e) => match e.kind {
                Some(event::Kind::Message(m)) => {
                    assert_eq!((m.seq, m.sender.as_str()), (i, "alice"));
                    assert_eq!(m.body, format!("hello {i}").into_bytes());
                }
                other => anyhow::bail!("unexpected event {other:?}"),
            },
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // Double tick, then blue tick.
    let (r, _) = bob
        .call(Body::Ack(Ack {
            conversation_id: "dm:alice:bob".into(),
            delivered_seq: 3,
        }))
        .await?;
    assert!(
        matches!(r?.result, Some(reply::Result::CursorSet(c)) if c.delivered_seq == 3 && c.read_seq == 0)
    );
    let receipt = next_receipt(&mut alice).await?;
    assert_eq!(
        (
            receipt.user_id.as_str(),
            receipt.delivered_seq,
            receipt.read_seq
        ),
        ("bob", 3, 0)
    );
    bob.call(Body::MarkRead(MarkRead {
        conversation_id: "dm:alice:bob".into(),
        read_seq: 2,
    }))
    .await?
    .0?;
    let receipt = next_receipt(&mut alice).await?;
    assert_eq!((receipt.delivered_seq, receipt.read_seq), (3, 2));

    // Bob turns read receipts off: his reads are stored but alice sees no blue tick.
    bob.call(Body::SetPrivacy(SetPrivacy {
        read_receipts: false,
    }))
    .await?
    .0?;
    bob.call(Body::MarkRead(MarkRead {
        conversation_id: "dm:alice:bob".into(),
        read_seq: 3,
    }))
    .await?
    .0?;
    let receipt = next_receipt(&mut alice).await?;
    assert_eq!(
        (receipt.delivered_seq, receipt.read_seq),
        (3, 0),
        "read receipt leaked"
    );
    // Reciprocal: bob sees no read receipts from alice either.
    let (r, _) = alice.call(send("m4", "bob", b"four")).await?;
    r?;
    let mut got = 0;
    while got == 0 {
        if let Received::Event(e) = bob.recv(T).await? {
            if matches!(e.kind, Some(event::Kind::Message(ref m)) if m.seq == 4) {
                got = 4;
            }
        }
    }
    alice
        .call(Body::MarkRead(MarkRead {
            conversation_id: "dm:alice:bob".into(),
            read_seq: 4,
        }))
        .await?
        .0?;
    let receipt = next_receipt(&mut bob).await?;
    assert_eq!((receipt.user_id.as_str(), receipt.read_seq), ("alice", 0));
    // A fresh sync reports the same: delivered cursors, no read cursors.
    let (mut alice2, _) = login(&eps[1], &alice_token).await?;
    let (r, events) = alice2.call(Body::Sync(Sync {})).await?;
    r?;
    let receipts: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e.kind {
            Some(event::Kind::Receipt(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(receipts.len(), 1);
    assert_eq!((receipts[0].delivered_seq, receipts[0].read_seq), (3, 0));
    Ok(())
}

async fn next_receipt(c: &mut RawConnection) -> anyhow::Result<parley_proto::v1::Receipt> {
    loop {
        match c.recv(T).await? {
            Received::Event(e) => {
                if let Some(event::Kind::Receipt(r)) = e.kind {
                    return Ok(r);
                }
            }
            Received::Closed(code) => anyhow::bail!("closed {code:?}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_documented_errors() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterOptions {
        extra_args: vec![
            "--rate-limit-per-s".into(),
            "5".into(),
            "--rate-limit-burst".into(),
            "5".into(),
            "--max-payload-bytes".into(),
            "1024".into(),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    let eps = cluster.client_endpoints();
    let (alice_token, alice_secret) = register(&eps[0], "alice").await?;
    register(&eps[0], "bob").await?;
    register(&eps[0], "carol").await?;

    let mut c = RawConnection::connect(&eps[1]).await?;
    // Nothing before authentication.
    expect_error(&mut c, send("m1", "bob", b"x"), ErrorCode::Unauthenticated).await?;
    expect_error(&mut c, Body::Sync(Sync {}), ErrorCode::Unauthenticated).await?;
    // Accounts.
    let taken = Body::Register(Register {
        user_id: "alice".into(),
        device_id: "x".into(),
    });
    expect_error(&mut c, taken, ErrorCode::UserExists).await?;
    for bad in ["Alice", "", "a b", "dm:x"] {
        let b = Body::Register(Register {
            user_id: bad.into(),
            device_id: "x".into(),
        });
        expect_error(&mut c, b, ErrorCode::InvalidArgument).await?;
    }
    let wrong = Body::Login(Login {
        user_id: "alice".into(),
        device_id: "phone".into(),
        device_secret: "nope".into(),
    });
    expect_error(&mut c, wrong, ErrorCode::BadCredentials).await?;
    let ghost = Body::Login(Login {
        user_id: "ghost".into(),
        device_id: "phone".into(),
        device_secret: "x".into(),
    });
    expect_error(&mut c, ghost, ErrorCode::UnknownUser).await?;
    let good = Body::Login(Login {
        user_id: "alice".into(),
        device_id: "phone".into(),
        device_secret: alice_secret,
    });
    let (r, _) = c.call(good).await?;
    assert!(matches!(r?.result, Some(reply::Result::LoggedIn(_))));
    // Tokens: garbage, another key's, expired.
    expect_error(
        &mut c,
        Body::Authenticate(Authenticate {
            token: "garbage".into(),
        }),
        ErrorCode::TokenInvalid,
    )
    .await?;
    let other_key = parley_node::tokens::TokenAuthority::from_pem(
        &parley_node::tokens::new_key_pem()?,
        Duration::from_secs(60),
    )
    .map_err(anyhow::Error::msg)?;
    let (forged, _) = other_key.issue("alice", "phone")?;
    expect_error(
        &mut c,
        Body::Authenticate(Authenticate { token: forged }),
        ErrorCode::TokenInvalid,
    )
    .await?;
    let real_key = parley_node::tokens::TokenAuthority::from_pem_file(
        &cluster.token_key_path(),
        Duration::from_secs(60),
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (expired, _) = real_key.issue_at("alice", "phone", now - 100, now - 10)?;
    expect_error(
        &mut c,
        Body::Authenticate(Authenticate { token: expired }),
        ErrorCode::TokenExpired,
    )
    .await?;
    // The connection is still usable: authenticate for real.
    let (r, _) = c
        .call(Body::Authenticate(Authenticate {
            token: alice_token.clone(),
        }))
        .await?;
    assert!(matches!(r?.result, Some(reply::Result::Authenticated(_))));
    expect_error(
        &mut c,
        Body::Authenticate(Authenticate {
            token: alice_token.clone(),
        }),
        ErrorCode::AlreadyAuthenticated,
    )
    .await?;

    // Membership: alice is not in bob and carol's conversation.
    let fetch = Body::Fetch(Fetch {
        conversation_id: "dm:bob:carol".into(),
        from_seq: 1,
        limit: 10,
    });
    expect_error(&mut c, fetch, ErrorCode::NotMember).await?;
    let ack = Body::Ack(Ack {
        conversation_id: "dm:bob:carol".into(),
        delivered_seq: 1,
    });
    expect_error(&mut c, ack, ErrorCode::NotMember).await?;
    let forged_id = Body::MarkRead(MarkRead {
        conversation_id: "dm:carol:alice".into(),
        read_seq: 1,
    });
    expect_error(&mut c, forged_id, ErrorCode::NotMember).await?;
    // Sends: too large, unknown recipient, to self, bad ids.
    let msg = expect_error(
        &mut c,
        send("big", "bob", &[7u8; 1025]),
        ErrorCode::PayloadTooLarge,
    )
    .await?;
    assert!(msg.contains("1024"), "{msg}");
    expect_error(&mut c, send("g1", "ghost", b"x"), ErrorCode::UnknownUser).await?;
    expect_error(
        &mut c,
        send("s1", "alice", b"x"),
        ErrorCode::InvalidArgument,
    )
    .await?;
    expect_error(&mut c, send("", "bob", b"x"), ErrorCode::InvalidArgument).await?;
    expect_error(
        &mut c,
        send(&"k".repeat(257), "bob", b"x"),
        ErrorCode::InvalidArgument,
    )
    .await?;
    // Nothing of the refused sends was stored.
    let (r, _) = c
        .call(Body::Fetch(Fetch {
            conversation_id: "dm:alice:bob".into(),
            from_seq: 1,
            limit: 10,
        }))
        .await?;
    match r?.result {
        Some(reply::Result::History(h)) => assert!(h.messages.is_empty(), "{h:?}"),
        other => anyhow::bail!("unexpected {other:?}"),
    }
    // Rate limit: a burst of 5, then RATE_LIMITED with a retry hint.
    let mut limited = None;
    for i in 0..20 {
        let (r, _) = c.call(send(&format!("r{i}"), "bob", b"x")).await?;
        if let Err(ServerError(e)) = r {
            assert_eq!(code(&e), ErrorCode::RateLimited, "{}", e.message);
            limited = Some((i, e.retry_after_ms));
            break;
        }
    }
    let (at, retry_after) = limited.expect("never rate limited");
    assert!(at >= 4, "limited after only {at} sends");
    assert!(retry_after > 0);
    // A frame over the limit closes the connection with 1009; the node stays up.
    c.send_bytes(vec![0u8; 1024 + 8192]).await?;
    let mut closed = None;
    for _ in 0..10 {
        if let Received::Closed(code) = c.recv(T).await? {
            closed = Some(code);
            break;
        }
    }
    assert_eq!(closed, Some(Some(1009)));
    let mut again = RawConnection::connect(&eps[1]).await?;
    let (r, _) = again.call(Body::Ping(Ping { nonce: 7 })).await?;
    assert!(matches!(r?.result, Some(reply::Result::Pong(p)) if p.nonce == 7));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_a_non_home_node_is_proxied_to_the_home() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterOptions::default()).await?;
    let eps = cluster.client_endpoints();
    let (token, _) = register(&eps[0], "dave").await?;
    // Every node names the same home.
    let mut homes = Vec::new();
    for ep in &eps {
        let (_c, home) = login(ep, &token).await?;
        homes.push(home);
    }
    assert!(
        homes.windows(2).all(|w| w[0] == w[1]),
        "homes disagree: {homes:?}"
    );
    let home = homes[0];
    let entry = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != home)
        .expect("a non-home node");
    let (mut c, reported) = login(&cluster.client_addr(entry).to_string(), &token).await?;
    assert_eq!(reported, home);
    let metrics = reqwest::get(format!("http://{}/metrics", cluster.http_addr(entry)))
        .await?
        .text()
        .await?;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("parley_connections{kind=\"proxied_out\"} ") && !l.ends_with(" 0")
        ),
        "no proxied connection on node {entry}"
    );
    // The relayed connection works both ways.
    let (eve_token, _) = register(&eps[0], "eve").await?;
    let (mut eve, _) = login(&eps[0], &eve_token).await?;
    eve.call(send("e1", "dave", b"hi dave")).await?.0?;
    loop {
        if let Received::Event(e) = c.recv(T).await? {
            if let Some(event::Kind::Message(m)) = e.kind {
                assert_eq!(
                    (m.sender.as_str(), m.body.as_slice()),
                    ("eve", &b"hi dave"[..])
                );
                break;
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_truncated_frames_never_take_a_node_down() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterOptions::default()).await?;
    let eps = cluster.client_endpoints();
    let (token, _) = register(&eps[0], "fuzz").await?;
    register(&eps[0], "target").await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let valid: Vec<Vec<u8>> = vec![
        parley_proto::v1::ClientFrame {
            request_id: 9,
            body: Some(send("f1", "target", b"payload")),
        }
        .encode_to_vec(),
        parley_proto::v1::ClientFrame {
            request_id: 9,
            body: Some(Body::Authenticate(Authenticate {
                token: token.clone(),
            })),
        }
        .encode_to_vec(),
        parley_proto::v1::ClientFrame {
            request_id: 9,
            body: Some(Body::Fetch(Fetch {
                conversation_id: "dm:fuzz:target".into(),
                from_seq: 0,
                limit: 5000,
            })),
        }
        .encode_to_vec(),
    ];
    let mut malformed = 0;
    for round in 0..6 {
        let authenticated = round % 2 == 1;
        let mut c = if authenticated {
            login(&eps[round % 3], &token).await?.0
        } else {
            RawConnection::connect(&eps[round % 3]).await?
        };
        for _ in 0..300 {
            let frame = match rng.random_range(0..4) {
                0 => {
                    let n = rng.random_range(0..200);
                    (0..n).map(|_| rng.random()).collect::<Vec<u8>>()
                }
                1 => {
                    let v = &valid[rng.random_range(0..valid.len())];
                    v[..rng.random_range(0..v.len())].to_vec()
                }
                2 => {
                    let mut v = valid[rng.random_range(0..valid.len())].clone();
                    let i = rng.random_range(0..v.len());
                    v[i] = rng.random();
                    v
                }
                _ => {
                    c.send_text("{\"not\": \"protobuf\"}").await?;
                    continue;
                }
            };
            c.send_bytes(frame).await?;
        }
        // Every frame got an answer or was ignored; read until quiet.
        loop {
            match tokio::time::timeout(Duration::from_secs(2), c.recv(T)).await {
                Ok(Ok(Received::Error(e))) if code(&e) == ErrorCode::MalformedFrame => {
                    malformed += 1
                }
                Ok(Ok(Received::Closed(code))) => {
                    anyhow::bail!("round {round}: server closed ({code:?})")
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        for id in cluster.node_ids() {
            let health = reqwest::get(format!("http://{}/healthz", cluster.http_addr(id))).await?;
            assert!(
                health.status().is_success(),
                "node {id} unhealthy after round {round}"
            );
        }
    }
    assert!(malformed > 100, "only {malformed} MALFORMED_FRAME answers");
    // Still serving real traffic.
    let (mut c, _) = login(&eps[2], &token).await?;
    let (r, _) = c.call(send("after", "target", b"still here")).await?;
    assert!(matches!(r?.result, Some(reply::Result::Sent(_))));
    Ok(())
}
