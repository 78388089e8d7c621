//! `zoomq demo` and `zoomq sandbox` (the human renderings of `stats` and `dead list` live with
//! the client, in `client::render`). The demo starts the sandbox and the real daemon (same code as `serve`) in a
//! temporary directory, runs a producer that edits a few messages much faster than Zoom's
//! limit, shows live progress, and finally checks that every message shows its last
//! acknowledged edit.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::plan::Plan;
use crate::sandbox::{Faults, Sandbox, SandboxConfig};

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Address to serve the fake Zoom API on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Plan of every account (free, pro, business).
    #[arg(long, default_value = "pro")]
    pub plan: Plan,
    #[arg(long, default_value = "sandbox-client")]
    pub client_id: String,
    #[arg(long, default_value = "sandbox-secret")]
    pub client_secret: String,
    /// Lifetime of issued tokens, e.g. "1h" or "30s".
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// Share of edit requests answered with a 5xx.
    #[arg(long, default_value_t = 0.0)]
    pub fault_5xx: f64,
    /// Share of edit requests answered by resetting the connection.
    #[arg(long, default_value_t = 0.0)]
    pub fault_reset: f64,
    /// Share of edit requests answered slowly (100-500 ms).
    #[arg(long, default_value_t = 0.0)]
    pub fault_slow: f64,
    /// Share of edit requests answered 429 with a Retry-After of one second.
    #[arg(long, default_value_t = 0.0)]
    pub fault_429: f64,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Messages the demo producer edits.
    #[arg(long, default_value_t = 8)]
    pub messages: usize,
    /// How long the producer keeps editing.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Edits per second the producer sends (over all messages).
    #[arg(long, default_value_t = 200)]
    pub edit_rate: u32,
    /// The sandbox account's plan.
    #[arg(long, default_value = "pro")]
    pub plan: Plan,
    /// Inject faults (5% 5xx, 2% connection resets, 0.5% bare 429s, as another app's burst
    /// would cause).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub faults: bool,
    /// Serve /metrics on this address during the demo (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Keep running (daemon and sandbox) after the check, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// `zoomq sandbox`: serves the fake Zoom until Ctrl-C.
pub async fn run_sandbox(args: SandboxArgs) -> anyhow::Result<()> {
    let config = SandboxConfig {
        client_id: args.client_id.clone(),
        client_secret: args.client_secret.clone(),
        token_ttl: args.token_ttl,
        default_plan: args.plan,
        faults: Faults {
            error_5xx: args.fault_5xx,
            reset: args.fault_reset,
            slow: args.fault_slow,
            spurious_429: args.fault_429,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let sandbox = Sandbox::start_on(listener, config).await?;
    println!(
        "zoomq sandbox: a fake Zoom API ({} plan) on http://{}",
        args.plan,
        sandbox.addr()
    );
    println!("  [zoom] api_base  = \"{}\"", sandbox.api_base());
    println!("  [zoom] token_url = \"{}\"", sandbox.token_url());
    println!(
        "  client_id = \"{}\", client_secret = \"{}\"",
        args.client_id, args.client_secret
    );
    println!(
        "  see a message:  curl http://{}/sandbox/messages/MESSAGE_ID",
        sandbox.addr()
    );
    println!(
        "  see the totals: curl http://{}/sandbox/stats",
        sandbox.addr()
    );
    println!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    sandbox.shutdown().await;
    Ok(())
}

/// `zoomq demo`.
pub async fn run_demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let account = "demo-account";
    let faults = if args.faults {
        Faults {
            error_5xx: 0.05,
            reset: 0.02,
            spurious_429: 0.005,
            spurious_429_retry_after: None,
            ..Faults::default()
        }
    } else {
        Faults::default()
    };
    let sandbox = Sandbox::start(SandboxConfig {
        default_plan: args.plan,
        faults,
        ..SandboxConfig::default()
    })
    .await
    .context("cannot start the sandbox")?;

    let config = demo_config(&sandbox, dir.path(), args.metrics_listen.clone());
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    let listener = crate::bind_socket(&config.socket)?;
    let socket = config.socket.path.clone();
    let cancel = CancellationToken::new();
    let daemon = tokio::spawn(crate::run(config, listener, cancel.clone()));

    println!(
        "zoomq demo: sandbox Zoom ({} plan, {}/s) on {}; daemon socket {}",
        args.plan,
        args.plan.per_second(),
        sandbox.addr(),
        socket.display()
    );
    println!(
        "producer: {} messages, {} edits/s for {:?}{}",
        args.messages,
        args.edit_rate,
        args.duration,
        if args.faults {
            "; Zoom answers 5% 5xx, 2% resets, 0.5% 429"
        } else {
            ""
        }
    );

    // Ctrl-C or SIGTERM stops the demo cleanly at any point.
    let stop = CancellationToken::new();
    tokio::spawn(cancel_on_signal(stop.clone()));

    let started = Instant::now();
    let producer = tokio::spawn(produce(
        socket.clone(),
        account.to_string(),
        args.messages,
        args.edit_rate,
        args.duration,
    ));
    // Live status line until the producer is done and the queue has drained.
    let mut producer = Some(producer);
    // The delivered rate, and the rate of requests Zoom answered (delivered or not): with
    // faults injected some requests fail, and each still counts against Zoom's limit.
    let mut delivery = SlidingRate::new(RATE_WINDOW);
    let mut requests = SlidingRate::new(RATE_WINDOW);
    let mut last_acked: HashMap<String, Value> = HashMap::new();
    let mut produce_error = None;
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => {
                interrupted = true;
                break;
            }
        }
        if let Some(handle) = producer.as_ref() {
            if handle.is_finished() {
                match producer.take().expect("present").await? {
                    Ok(acked) => last_acked = acked,
                    Err(e) => produce_error = Some(e),
                }
            }
        }
        let stats = crate::client::request(&socket, &json!({"op": "stats"})).await?;
        let delivered = stats["delivered"].as_u64().unwrap_or(0);
        let waiting =
            stats["pending"].as_u64().unwrap_or(0) + stats["in_flight"].as_u64().unwrap_or(0);
        let now = Instant::now();
        delivery.sample(now, delivered, waiting > 0);
        requests.sample(now, answered(&stats), waiting > 0);
        let limit = account_limit(&stats, account).unwrap_or(f64::from(args.plan.per_second()));
        let paused = account_row(&stats, account).is_some_and(|row| row["paused"] == true);
        print!(
            "\r  {:5.1}s  accepted {:6}  coalesced {:6}  sent {:5}  retried {:4}  429 {:3}  pending {:4}  delivered {:5.1}/s of {}/s (requests {:4.1}/s){}",
            started.elapsed().as_secs_f64(),
            stats["accepted"].as_u64().unwrap_or(0),
            stats["coalesced"].as_u64().unwrap_or(0),
            delivered,
            stats["retries"].as_u64().unwrap_or(0),
            stats["rate_limited"].as_u64().unwrap_or(0),
            waiting,
            delivery.rate().unwrap_or(0.0),
            format_rate(limit),
            requests.rate().unwrap_or(0.0),
            if paused { " paused by a 429 " } else { "                 " },
        );
        std::io::stdout().flush().ok();
        let drained = stats["pending"] == 0 && stats["in_flight"] == 0;
        if producer.is_none() && drained {
            println!();
            break;
        }
        if started.elapsed() > args.duration + Duration::from_secs(120) {
            println!();
            anyhow::bail!("the queue did not drain within two minutes after the producer stopped");
        }
    }
    if interrupted {
        println!("\ninterrupted; stopping");
        if let Some(handle) = producer {
            handle.abort();
        }
        cancel.cancel();
        daemon.await??;
        sandbox.shutdown().await;
        return Ok(ExitCode::from(130));
    }
    if let Some(e) = produce_error {
        return Err(e.context("the demo producer failed"));
    }

    // The check: every message shows its last acknowledged edit.
    let mut wrong = 0;
    for (message_id, content) in &last_acked {
        let shown = sandbox.message(message_id).and_then(|m| m.content);
        if shown.as_ref() != Some(content) {
            wrong += 1;
            println!("  MISMATCH {message_id}: Zoom shows {shown:?}, last acknowledged {content}");
        }
    }
    let stats = crate::client::request(&socket, &json!({"op": "stats"})).await?;
    let zoom = sandbox.stats();
    println!(
        "done in {:.1}s: {} edits accepted, {} coalesced, {} requests to Zoom ({} delivered, {} retried, {} answered 429), {} dead letters",
        started.elapsed().as_secs_f64(),
        stats["accepted"],
        stats["coalesced"],
        zoom.requests_total,
        stats["delivered"],
        stats["retries"],
        stats["rate_limited"],
        stats["dead"],
    );
    let max_concurrent = last_acked
        .keys()
        .filter_map(|id| sandbox.message(id))
        .map(|m| m.max_concurrent)
        .max()
        .unwrap_or(0);
    println!("most requests in flight for one message at once: {max_concurrent}");
    let limit = account_limit(&stats, account).unwrap_or(f64::from(args.plan.per_second()));
    if let (Some(average), Some(sent)) =
        (delivery.backlogged_average(), requests.backlogged_average())
    {
        let lowest = match delivery.lowest_full_window() {
            Some(lowest) => format!(" (lowest over {} s: {lowest:.1}/s)", RATE_WINDOW.as_secs()),
            None => String::new(),
        };
        println!(
            "while edits were waiting: delivered {average:.1}/s on average{lowest} of a limit of {}/s, {:.0}% used; requests to Zoom {sent:.1}/s",
            format_rate(limit),
            100.0 * average / limit
        );
    }
    if args.keep_running {
        println!("daemon and sandbox keep running; Ctrl-C stops them");
        stop.cancelled().await;
    }
    cancel.cancel();
    daemon.await??;
    sandbox.shutdown().await;
    if wrong == 0 && !last_acked.is_empty() && max_concurrent <= 1 {
        println!(
            "check passed: all {} messages show their last acknowledged edit",
            last_acked.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "check FAILED: {wrong} of {} messages differ",
            last_acked.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The demo daemon's configuration: the defaults, aimed at the sandbox, with shorter retry
/// delays. The metrics settings stay the defaults (apart from the address), so the demo (and
/// deploy/check-live.sh, which runs it) shows what a new user's daemon exports.
fn demo_config(
    sandbox: &Sandbox,
    dir: &std::path::Path,
    metrics_listen: Option<String>,
) -> crate::config::Config {
    let mut config = sandbox.daemon_config(dir);
    config.metrics.listen = metrics_listen.unwrap_or_default();
    config.delivery.retry_initial = Duration::from_millis(500);
    config.delivery.retry_max = Duration::from_secs(5);
    config
}

/// Cancels `stop` on SIGINT or SIGTERM.
async fn cancel_on_signal(stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    stop.cancel();
}

/// The demo producer: pipelines edits over one connection at `rate` per second and returns
/// the last acknowledged content of each message.
async fn produce(
    socket: std::path::PathBuf,
    account: String,
    messages: usize,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<HashMap<String, Value>> {
    let stream = UnixStream::connect(&socket).await?;
    let (reader, mut writer) = stream.into_split();
    let mut answers = BufReader::new(reader).lines();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let reader_task = tokio::spawn(async move {
        let mut acked = HashMap::new();
        while let Some((message_id, content)) = sent_rx.recv().await {
            let line = answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            let answer: Value = serde_json::from_str(&line)?;
            if answer["ok"] == true {
                acked.insert(message_id, content);
            } else {
                anyhow::bail!("edit refused: {line}");
            }
        }
        Ok::<_, anyhow::Error>(acked)
    });
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        let message = n as usize % messages.max(1);
        let message_id = format!("demo-msg-{message}");
        let step = n / messages.max(1) as u64;
        let content = json!({
            "head": {"text": format!("Build {message}")},
            "body": [{"type": "message", "text": format!("step {step} done")}]
        });
        let request = json!({
            "op": "edit",
            "message_id": message_id,
            "account_id": account,
            "robot_jid": "demo-bot@xmpp.zoom.us",
            "content": content,
        });
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        writer.write_all(&line).await?;
        let _ = sent_tx.send((message_id, content));
        n += 1;
    }
    drop(sent_tx);
    reader_task.await?
}

/// The span over which the demo's status line averages rates.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// A rate as the demo sees it: samples of one of the daemon's counters (from `stats`, e.g.
/// `delivered`), averaged over a sliding window, plus figures over the time edits were waiting
/// (when the rate should be at the limit).
#[derive(Debug)]
struct SlidingRate {
    window: Duration,
    /// (when, counter), oldest first, spanning at most `window` plus one sample.
    samples: VecDeque<(Instant, u64)>,
    /// When the current stretch of samples that all saw edits waiting began.
    backlog_start: Option<Instant>,
    /// Time and counter increase between consecutive samples that both saw edits waiting,
    /// summed: (seconds, increase).
    backlogged: (f64, u64),
    /// The lowest rate over a whole window during which edits were waiting throughout.
    lowest: Option<f64>,
}

impl SlidingRate {
    fn new(window: Duration) -> SlidingRate {
        SlidingRate {
            window,
            samples: VecDeque::new(),
            backlog_start: None,
            backlogged: (0.0, 0),
            lowest: None,
        }
    }

    /// Records the counter's value at `now`; `waiting` is whether edits were pending or in
    /// flight.
    fn sample(&mut self, now: Instant, count: u64, waiting: bool) {
        if let Some(&(last_at, last)) = self.samples.back() {
            if waiting && self.backlog_start.is_some() {
                let seconds = now.saturating_duration_since(last_at).as_secs_f64();
                self.backlogged.0 += seconds;
                self.backlogged.1 += count.saturating_sub(last);
            }
        }
        self.samples.push_back((now, count));
        while self.samples.len() > 2
            && now.saturating_duration_since(self.samples[1].0) >= self.window
        {
            self.samples.pop_front();
        }
        match (waiting, self.backlog_start) {
            (false, _) => self.backlog_start = None,
            (true, None) => self.backlog_start = Some(now),
            (true, Some(since)) => {
                let (oldest_at, _) = self.samples[0];
                if oldest_at >= since && now.saturating_duration_since(oldest_at) >= self.window {
                    if let Some(rate) = self.rate() {
                        self.lowest = Some(self.lowest.map_or(rate, |low| low.min(rate)));
                    }
                }
            }
        }
    }

    /// Increase per second over the last window (less at the start); `None` before two
    /// samples.
    fn rate(&self) -> Option<f64> {
        let (&(first_at, first), &(last_at, last)) = (self.samples.front()?, self.samples.back()?);
        let seconds = last_at.saturating_duration_since(first_at).as_secs_f64();
        (seconds > 0.0).then(|| last.saturating_sub(first) as f64 / seconds)
    }

    /// Increase per second over all the time edits were waiting.
    fn backlogged_average(&self) -> Option<f64> {
        let (seconds, increase) = self.backlogged;
        (seconds >= 1.0).then(|| increase as f64 / seconds)
    }

    fn lowest_full_window(&self) -> Option<f64> {
        self.lowest
    }
}

/// Requests Zoom answered, from a `stats` answer: delivered, failed and retried, answered
/// 429, or refused for good.
fn answered(stats: &Value) -> u64 {
    ["delivered", "retries", "rate_limited", "dead_lettered"]
        .iter()
        .map(|key| stats[*key].as_u64().unwrap_or(0))
        .sum()
}

/// The row of `account` among the `per_account` rows of a `stats` answer.
fn account_row<'a>(stats: &'a Value, account: &str) -> Option<&'a Value> {
    stats["per_account"]
        .as_array()?
        .iter()
        .find(|row| row["account_id"] == account)
}

/// The limit of `account` from the `per_account` rows of a `stats` answer.
fn account_limit(stats: &Value, account: &str) -> Option<f64> {
    account_row(stats, account)?["limit"].as_f64()
}

/// A rate for people: "20" for whole numbers, "7.5" otherwise.
fn format_rate(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_rate_slides_over_its_window() {
        let start = Instant::now();
        let mut rate = SlidingRate::new(Duration::from_secs(5));
        assert_eq!(rate.rate(), None);
        // 20 deliveries a second for 10 s, sampled every 250 ms, edits waiting throughout.
        for tick in 0..=40u64 {
            rate.sample(start + Duration::from_millis(250 * tick), 5 * tick, true);
        }
        assert!((rate.rate().unwrap() - 20.0).abs() < 1e-9);
        // Then 2 s without a delivery: the last 5 s hold 3 s of deliveries.
        for tick in 41..=48u64 {
            rate.sample(start + Duration::from_millis(250 * tick), 200, true);
        }
        assert!(
            (rate.rate().unwrap() - 12.0).abs() < 1e-9,
            "{:?}",
            rate.rate()
        );
        assert!((rate.lowest_full_window().unwrap() - 12.0).abs() < 1e-9);
        assert!((rate.backlogged_average().unwrap() - 200.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn idle_time_counts_neither_in_the_average_nor_in_the_lowest_window() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rate = SlidingRate::new(Duration::from_secs(5));
        // 3 s at 20/s with edits waiting, then 10 s idle, then 2 s at 20/s again.
        for tick in 0..=12u64 {
            rate.sample(at(250 * tick), 5 * tick, true);
        }
        for tick in 13..=52u64 {
            rate.sample(at(250 * tick), 60, false);
        }
        for tick in 53..=60u64 {
            rate.sample(at(250 * tick), 60 + 5 * (tick - 52), true);
        }
        assert!((rate.backlogged_average().unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(
            rate.lowest_full_window(),
            None,
            "no whole window was backlogged"
        );
    }

    #[tokio::test]
    async fn the_demo_daemon_keeps_the_default_metrics_settings() {
        let sandbox = Sandbox::start(SandboxConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = demo_config(&sandbox, dir.path(), Some("127.0.0.1:9464".into()));
        let defaults = crate::config::MetricsConfig::default();
        assert_eq!(
            config.metrics.per_account_series,
            defaults.per_account_series
        );
        assert!(
            config.metrics.per_account_series > 0,
            "per-account series are needed by the dashboard's per-account panels"
        );
        config.validate().unwrap();
        sandbox.shutdown().await;
    }

    #[test]
    fn the_demo_reads_its_limit_from_the_rows() {
        let stats = serde_json::json!({"ok": true, "per_account": [
            {"account_id": "demo-account", "pending": 9, "limit": 20.0, "allowed": 19.4,
             "delivered": 19.3, "paused": false},
            {"account_id": "acct-free", "pending": 0, "limit": 2.0, "allowed": 0.0,
             "delivered": 0.5, "paused": true},
        ]});
        assert_eq!(account_limit(&stats, "acct-free"), Some(2.0));
        assert_eq!(account_limit(&stats, "other"), None);
        assert_eq!(format_rate(20.0), "20");
        assert_eq!(format_rate(7.5), "7.5");
    }
}
