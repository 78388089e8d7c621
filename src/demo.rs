//! `zoomq demo` and `zoomq sandbox`, and the human-readable renderings of `stats` and
//! `dead list`. The demo starts the sandbox and the real daemon (same code as `serve`) in a
//! temporary directory, runs a producer that edits a few messages much faster than Zoom's
//! limit, shows live progress, and finally checks that every message shows its last
//! acknowledged edit.

use std::collections::HashMap;
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
    /// Inject faults (5% 5xx, 2% connection resets, 2% 429 with Retry-After).
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
            spurious_429: 0.02,
            spurious_429_delay: Duration::from_secs(1),
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

    let mut config = sandbox.daemon_config(dir.path());
    config.metrics.listen = args.metrics_listen.clone().unwrap_or_default();
    config.delivery.retry_initial = Duration::from_millis(500);
    config.delivery.retry_max = Duration::from_secs(5);
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
            "; Zoom answers 5% 5xx, 2% resets, 2% 429"
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
        print!(
            "\r  {:5.1}s  accepted {:6}  coalesced {:6}  sent {:5}  retried {:4}  429 {:3}  pending {:4}  rate {:5.1}/s  ",
            started.elapsed().as_secs_f64(),
            stats["accepted"].as_u64().unwrap_or(0),
            stats["coalesced"].as_u64().unwrap_or(0),
            delivered,
            stats["retries"].as_u64().unwrap_or(0),
            stats["rate_limited"].as_u64().unwrap_or(0),
            stats["pending"].as_u64().unwrap_or(0) + stats["in_flight"].as_u64().unwrap_or(0),
            delivered as f64 / started.elapsed().as_secs_f64(),
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

/// Renders a `stats` answer for people.
pub fn format_stats(stats: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: &Value| {
        out.push_str(&format!("{label:<24} {}\n", render(value)));
    };
    for (label, key) in [
        ("pending", "pending"),
        ("in flight", "in_flight"),
        ("dead letters", "dead"),
        ("accounts with work", "accounts"),
        ("oldest pending (s)", "oldest_pending_seconds"),
        ("accepted", "accepted"),
        ("coalesced", "coalesced"),
        ("superseded", "superseded"),
        ("delivered", "delivered"),
        ("retries", "retries"),
        ("answered 429", "rate_limited"),
        ("dead-lettered", "dead_lettered"),
        ("accounts paused", "accounts_paused"),
        ("allowed rate (req/s)", "limiter_rate"),
        ("producer connections", "connections"),
    ] {
        line(&mut out, label, &stats[key]);
    }
    if let Some(error) = stats["storage_error"].as_str() {
        out.push_str(&format!("STORAGE ERROR            {error}\n"));
    }
    if let Some(error) = stats["token_error"].as_str() {
        out.push_str(&format!("TOKEN ERROR              {error}\n"));
    }
    out
}

fn render(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// Renders a `dead_list` answer for people.
pub fn format_dead_list(answer: &Value) -> String {
    let Some(dead) = answer["dead"].as_array() else {
        return "no dead letters\n".into();
    };
    if dead.is_empty() {
        return "no dead letters\n".into();
    }
    let mut out = format!(
        "{:<10} {:<28} {:<20} {:<9} {:>6} {:>6}  {}\n",
        "JOB", "MESSAGE", "ACCOUNT", "REASON", "STATUS", "CODE", "DETAIL"
    );
    for d in dead {
        out.push_str(&format!(
            "{:<10} {:<28} {:<20} {:<9} {:>6} {:>6}  {}\n",
            d["job_id"].as_str().unwrap_or("?"),
            d["message_id"].as_str().unwrap_or("?"),
            d["account_id"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or("?"),
            render(&d["status"]),
            render(&d["zoom_code"]),
            d["detail"].as_str().unwrap_or(""),
        ));
    }
    out
}
