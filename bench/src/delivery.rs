//! `parley-bench delivery`: end-to-end latency of 1:1 messages, from the moment the
//! sender calls `send` to the moment the recipient's SDK hands the message to the
//! application, at stepped open-loop send rates.
//!
//! `--users` SDK clients (real WebSocket sessions, delivery acknowledged automatically
//! as an application would) are paired; each pair sends to each other. A step sends at
//! its target rate for `--seconds`, spread round-robin over the users, each send
//! started on schedule whether or not earlier ones finished (open loop, so a slow
//! server shows up as latency, not as a lower offered rate). Every message body
//! carries its step and its send time; the recipient records the latency in that
//! step's histogram. After the sending time, a step waits (bounded) for the messages
//! still in flight, then reports what was delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use clap::Args;
use hdrhistogram::Histogram;
use parley_client::{Client, ClientConfig, ClientEvent, Events};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::local::{register_all, run_tag, with_workdir, Cluster, ClusterArgs};

/// The latency bound a step must keep its p99 under to count.
const P99_GOAL_MS: f64 = 100.0;
/// Largest latency the histograms hold, in microseconds.
const MAX_LATENCY_US: u64 = 60_000_000;
/// How long a step waits for messages still in flight after its sending time.
const DRAIN: Duration = Duration::from_secs(5);
/// Sends in flight at once, across all users (beyond it the offered rate drops and the
/// step says so).
const MAX_IN_FLIGHT: usize = 20_000;
/// Bytes at the start of a body: step (4) and send time in microseconds (8).
const HEADER: usize = 12;

#[derive(Debug, Args)]
pub struct DeliveryArgs {
    /// Connected users (an even number; they send in pairs).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Target send rates of the steps, messages per second (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "250,500,1000,1500,2000,3000,4000,6000"
    )]
    rates: Vec<u64>,
    /// Seconds of sending per step.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Body size in bytes (clients encrypt, so the body is random bytes).
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Keep stepping after a step's p99 exceeded 100 ms.
    #[arg(long)]
    all_steps: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// What one step measured.
#[derive(Debug)]
pub struct StepResult {
    pub target_per_s: u64,
    pub sent: u64,
    pub send_errors: u64,
    pub delivered: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub first_error: Option<String>,
}

impl StepResult {
    pub fn delivered_per_s(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Latency histograms per step, filled by the recipients.
struct Recorder {
    epoch: Instant,
    steps: Vec<Mutex<Histogram<u64>>>,
    delivered: Vec<AtomicU64>,
}

impl Recorder {
    fn record(&self, body: &[u8]) {
        let Some((step, sent_us)) = parse_header(body) else {
            return;
        };
        let (Some(hist), Some(count)) = (self.steps.get(step), self.delivered.get(step)) else {
            return;
        };
        let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let latency = now_us.saturating_sub(sent_us).max(1);
        if let Ok(mut h) = hist.lock() {
            h.saturating_record(latency);
        }
        count.fetch_add(1, Ordering::Relaxed);
    }
}

fn header(step: usize, sent_us: u64, body_bytes: usize) -> Vec<u8> {
    let mut body = vec![0u8; body_bytes.max(HEADER)];
    rand::Rng::fill(&mut rand::rng(), &mut body[HEADER..]);
    body[..4].copy_from_slice(&(step as u32).to_be_bytes());
    body[4..HEADER].copy_from_slice(&sent_us.to_be_bytes());
    body
}

fn parse_header(body: &[u8]) -> Option<(usize, u64)> {
    let step = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let sent = u64::from_be_bytes(body.get(4..HEADER)?.try_into().ok()?);
    Some((step, sent))
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("cannot create a histogram")
}

pub async fn run(args: DeliveryArgs) -> anyhow::Result<()> {
    ensure!(
        args.users >= 2 && args.users.is_multiple_of(2),
        "--users must be an even number of at least 2"
    );
    ensure!(!args.rates.is_empty(), "no --rates");
    ensure!(args.rates.iter().all(|&r| r > 0), "rates must be positive");
    ensure!(args.seconds > 0, "--seconds must be at least 1");
    let data_root = args.cluster.data_root.clone();
    with_workdir(data_root.as_deref(), |root| async move {
        let cluster = Cluster::start(&args.cluster, &root).await?;
        measure(&args, &cluster).await
    })
    .await
}

async fn measure(args: &DeliveryArgs, cluster: &Cluster) -> anyhow::Result<()> {
    let tag = run_tag();
    let names: Vec<String> = (0..args.users).map(|i| format!("d{tag}-{i}")).collect();
    eprintln!("registering {} users", names.len());
    let credentials = register_all(&cluster.endpoints, names.clone()).await?;

    let recorder = Arc::new(Recorder {
        epoch: Instant::now(),
        steps: (0..args.rates.len() + 1)
            .map(|_| histogram().map(Mutex::new))
            .collect::<anyhow::Result<_>>()?,
        delivered: (0..args.rates.len() + 1)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    eprintln!("connecting {} users", names.len());
    let mut clients = Vec::with_capacity(names.len());
    for (i, creds) in credentials.into_iter().enumerate() {
        // As behind a load balancer: each user starts at a different node.
        let mut endpoints = cluster.endpoints.clone();
        let first = i % endpoints.len();
        endpoints.rotate_left(first);
        let config = ClientConfig {
            event_buffer: 16_384,
            ..ClientConfig::new(endpoints)
        };
        let (client, events) = Client::connect(config, creds)
            .await
            .with_context(|| format!("connecting {}", names[i]))?;
        tokio::spawn(receive(events, recorder.clone()));
        clients.push(client);
    }
    let peers: Vec<String> = (0..args.users).map(|i| names[i ^ 1].clone()).collect();

    // A short warm-up at the lowest rate (step index = rates.len(), not reported).
    let warmup = args.rates.iter().copied().min().unwrap_or(1);
    let warm = args.rates.len();
    run_step(
        &clients,
        &peers,
        &recorder,
        warm,
        warmup,
        Duration::from_secs(2),
        args.body_bytes,
    )
    .await?;

    let mut results = Vec::new();
    for (step, &rate) in args.rates.iter().enumerate() {
        let r = run_step(
            &clients,
            &peers,
            &recorder,
            step,
            rate,
            Duration::from_secs(args.seconds),
            args.body_bytes,
        )
        .await?;
        eprintln!("{}", row(&r));
        if let Some(e) = &r.first_error {
            eprintln!("  first send error: {e}");
        }
        let over = r.ms(0.99) >= P99_GOAL_MS;
        results.push(r);
        if over && !args.all_steps {
            eprintln!("p99 at or above {P99_GOAL_MS} ms: stopping (--all-steps to go on)");
            break;
        }
    }
    for c in &clients {
        c.close().await;
    }

    println!(
        "delivery: {} users in {} pairs, {}-byte bodies, {} s per step, send -> recipient's SDK",
        args.users,
        args.users / 2,
        args.body_bytes.max(HEADER),
        args.seconds
    );
    println!("{}", table(&results));
    let best = results
        .iter()
        .filter(|r| r.delivered > 0 && r.ms(0.99) < P99_GOAL_MS)
        .max_by(|a, b| a.delivered_per_s().total_cmp(&b.delivered_per_s()));
    let Some(best) = best else {
        anyhow::bail!("no step kept p99 under {P99_GOAL_MS} ms; no RESULT");
    };
    println!("{}", result_line(best));
    Ok(())
}

/// Takes every event so that delivery is acknowledged, recording message latencies.
async fn receive(mut events: Events, recorder: Arc<Recorder>) {
    while let Some(event) = events.recv().await {
        if let ClientEvent::Message(m) = event {
            recorder.record(&m.body);
        }
    }
}

async fn run_step(
    clients: &[Client],
    peers: &[String],
    recorder: &Arc<Recorder>,
    step: usize,
    rate: u64,
    duration: Duration,
    body_bytes: usize,
) -> anyhow::Result<StepResult> {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let started = Instant::now();
    let end = started + duration;
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sends = tokio::task::JoinSet::new();
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Sends due by now at the target rate, started in one go.
        let due = (now - started).as_secs_f64() * rate as f64;
        while (sent as f64) < due {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                break;
            };
            let user = (sent as usize) % clients.len();
            let client = clients[user].clone();
            let peer = peers[user].clone();
            let sent_us = u64::try_from(recorder.epoch.elapsed().as_micros()).unwrap_or(0);
            let body = header(step, sent_us, body_bytes);
            let (errors, first_error) = (errors.clone(), first_error.clone());
            sends.spawn(async move {
                let _permit = permit;
                if let Err(e) = client.send(&peer, body).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut f) = first_error.lock() {
                        f.get_or_insert_with(|| e.to_string());
                    }
                }
            });
            sent += 1;
        }
        while sends.try_join_next().is_some() {}
    }
    let send_time = started.elapsed();
    // Wait for what is in flight: sends answered, then messages delivered.
    let drain_end = Instant::now() + DRAIN;
    while !sends.is_empty() && Instant::now() < drain_end {
        let _ = tokio::time::timeout_at(drain_end, sends.join_next()).await;
    }
    let send_errors = errors.load(Ordering::Relaxed);
    let expected = sent.saturating_sub(send_errors);
    while recorder.delivered[step].load(Ordering::Relaxed) < expected && Instant::now() < drain_end
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sends.abort_all();
    let latency_us = recorder.steps[step]
        .lock()
        .map_err(|_| anyhow::anyhow!("latency histogram poisoned"))?
        .clone();
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    Ok(StepResult {
        target_per_s: rate,
        sent,
        send_errors,
        delivered: recorder.delivered[step].load(Ordering::Relaxed),
        elapsed: send_time,
        latency_us,
        first_error,
    })
}

/// Messages sent (answered SENT) but not delivered by the end of the step's drain.
fn undelivered(r: &StepResult) -> u64 {
    r.sent
        .saturating_sub(r.send_errors)
        .saturating_sub(r.delivered)
}

fn row(r: &StepResult) -> String {
    format!(
        "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
        r.target_per_s,
        r.sent,
        r.delivered_per_s(),
        r.ms(0.50),
        r.ms(0.99),
        r.ms(0.999),
        r.latency_us.max() as f64 / 1000.0,
        r.send_errors,
        undelivered(r)
    )
}

pub fn table(results: &[StepResult]) -> String {
    let mut out = String::from(
        "| target/s | sent | delivered/s | p50 ms | p99 ms | p99.9 ms | max ms | send errors | undelivered |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    );
    for r in results {
        out.push('\n');
        out.push_str(&row(r));
    }
    out
}

pub fn result_line(r: &StepResult) -> String {
    format!(
        "RESULT msgs_per_s={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2}",
        r.delivered_per_s(),
        r.ms(0.50),
        r.ms(0.99),
        r.ms(0.999)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_step_and_send_time() {
        let body = header(3, 123_456_789, 256);
        assert_eq!(body.len(), 256);
        assert_eq!(parse_header(&body), Some((3, 123_456_789)));
        // Too short to carry a header: ignored, never a panic.
        assert_eq!(parse_header(&body[..5]), None);
        // A body smaller than the header still gets one.
        assert_eq!(header(0, 1, 4).len(), HEADER);
    }

    #[test]
    fn result_line_has_the_exact_format() -> anyhow::Result<()> {
        let mut latency_us = histogram()?;
        for v in 1..=1000u64 {
            latency_us.record(v * 100)?;
        }
        let r = StepResult {
            target_per_s: 1000,
            sent: 10_000,
            send_errors: 0,
            delivered: 10_000,
            elapsed: Duration::from_secs(10),
            latency_us,
            first_error: None,
        };
        let line = result_line(&r);
        assert!(
            line.starts_with("RESULT msgs_per_s=1000 p50_ms=50.") && line.contains(" p999_ms="),
            "{line}"
        );
        Ok(())
    }
}
