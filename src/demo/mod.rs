//! `zoomq demo` and `zoomq sandbox` (the human renderings of `stats` and `dead list` live with
//! the client, in `client::render`). The demo starts the sandbox and the real daemon (same code
//! as `serve`) in a temporary directory and two producers on one account, both much faster
//! than Zoom's limit: one edits a few messages by id, and a bot leaves its messages' whole life
//! to zoomq (send, edits and deletes by ref). It shows live progress and finally checks what
//! Zoom shows against what the daemon acknowledged.
//!
//! This file holds the arguments and the run; the rest is split by concern:
//!
//! - `producer.rs`: the edits by message id.
//! - `lifecycle.rs`: the bot's messages by ref.
//! - `socket.rs`: pipelined requests and single questions on the daemon's socket.
//! - `status.rs`: the live status line and the rates it shows.
//! - `check.rs`: the end-state check at the sandbox.

mod check;
mod lifecycle;
mod producer;
mod socket;
mod status;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::plan::Plan;
use crate::sandbox::{Faults, Sandbox, SandboxConfig};

/// The bot both producers speak for.
const ROBOT_JID: &str = "demo-bot@xmpp.zoom.us";

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
    /// Share of requests (sends, edits, deletes) answered with a 5xx.
    #[arg(long, default_value_t = 0.0)]
    pub fault_5xx: f64,
    /// Share of requests (sends, edits, deletes) answered by resetting the connection.
    #[arg(long, default_value_t = 0.0)]
    pub fault_reset: f64,
    /// Share of requests applied (a send posts its message) and then answered by resetting the
    /// connection: the client cannot know it worked. Test a bot's handling of duplicates.
    #[arg(long, default_value_t = 0.0)]
    pub fault_reset_after_apply: f64,
    /// Share of requests applied and then answered 500, 502 or 504.
    #[arg(long, default_value_t = 0.0)]
    pub fault_5xx_after_apply: f64,
    /// Share of requests (sends, edits, deletes) answered slowly (100-500 ms).
    #[arg(long, default_value_t = 0.0)]
    pub fault_slow: f64,
    /// Share of requests (sends, edits, deletes) answered 429 with a Retry-After of one second.
    #[arg(long, default_value_t = 0.0)]
    pub fault_429: f64,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Messages the demo producer edits by message id.
    #[arg(long, default_value_t = 8)]
    pub messages: usize,
    /// How long the producer and the bot keep editing.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Edits per second the producer sends (over all messages).
    #[arg(long, default_value_t = 200)]
    pub edit_rate: u32,
    /// The sandbox account's plan.
    #[arg(long, default_value = "pro")]
    pub plan: Plan,
    /// Messages the demo bot sends by ref, edits by ref and (every third one) deletes.
    #[arg(long, default_value_t = 6)]
    pub bot_messages: usize,
    /// Edits per second the bot sends by ref (over all its messages).
    #[arg(long, default_value_t = 60)]
    pub bot_edit_rate: u32,
    /// Inject faults (5% 5xx, 2% connection resets, 0.5% bare 429s, as another app's burst
    /// would cause), all before Zoom applies the request.
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
            reset_after_apply: args.fault_reset_after_apply,
            error_5xx_after_apply: args.fault_5xx_after_apply,
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
    // Every fault the demo injects comes before Zoom applies the request: none of the
    // after-apply kinds. A send whose outcome is unknown is sent again (the default
    // `delivery.send_in_doubt = "retry"`), which after one of these faults never posts a second
    // message, so the check can demand exactly one message per ref. Had Zoom posted the message
    // and lost the answer, the retry would post it twice: zoomq's documented at-least-once,
    // which a check of "exactly one" could not tell from a bug.
    let faults = if args.faults {
        Faults {
            error_5xx: 0.05,
            reset: 0.02,
            spurious_429: 0.005,
            spurious_429_retry_after: None,
            reset_after_apply: 0.0,
            error_5xx_after_apply: 0.0,
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
    if args.bot_messages > 0 {
        println!(
            "bot: {} messages by ref, {} edits/s by ref, sent again halfway, every third deleted near the end",
            args.bot_messages, args.bot_edit_rate
        );
    }

    // Ctrl-C or SIGTERM stops the demo cleanly at any point.
    let stop = CancellationToken::new();
    tokio::spawn(cancel_on_signal(stop.clone()));

    let started = Instant::now();
    let mut producer = Some(tokio::spawn(producer::produce(
        socket.clone(),
        account.to_string(),
        args.messages,
        args.edit_rate,
        args.duration,
    )));
    let (events, mut bot_events) = tokio::sync::mpsc::unbounded_channel();
    let bot_plan = lifecycle::BotPlan {
        account: account.to_string(),
        messages: args.bot_messages,
        rate: args.bot_edit_rate,
        duration: args.duration,
    };
    let mut bot = Some(tokio::spawn(lifecycle::run_bot(
        socket.clone(),
        bot_plan,
        events,
    )));
    // Live status line until both producers are done and the queue has drained.
    let mut live = status::Live::new(started, account, f64::from(args.plan.per_second()));
    let (mut produced, mut bot_run) = (None, None);
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => {
                interrupted = true;
                break;
            }
        }
        take_if_finished(&mut producer, &mut produced).await?;
        take_if_finished(&mut bot, &mut bot_run).await?;
        while let Ok(event) = bot_events.try_recv() {
            live.event(&event);
        }
        let stats = crate::client::request(&socket, &json!({"op": "stats"})).await?;
        live.update(&stats);
        if producer.is_none() && bot.is_none() && status::waiting(&stats) == 0 {
            println!();
            break;
        }
        if started.elapsed() > args.duration + Duration::from_secs(120) {
            println!();
            anyhow::bail!("the queue did not drain within two minutes after the producers stopped");
        }
    }
    if interrupted {
        println!("\ninterrupted; stopping");
        if let Some(task) = &producer {
            task.abort();
        }
        if let Some(task) = &bot {
            task.abort();
        }
        cancel.cancel();
        daemon.await??;
        sandbox.shutdown().await;
        return Ok(ExitCode::from(130));
    }
    let last_acked = produced
        .expect("finished")
        .context("the demo producer failed")?;
    let bot_run = bot_run.expect("finished").context("the demo bot failed")?;

    let mut check = check::Check::default();
    check.edits(&sandbox, &last_acked);
    check.bot(&sandbox, &socket, account, &bot_run).await?;
    check.concurrency(&sandbox);

    let stats = crate::client::request(&socket, &json!({"op": "stats"})).await?;
    println!(
        "done in {:.1}s: {} requests accepted ({} coalesced), {} requests to Zoom ({} delivered, {} retried, {} answered 429), {} dead letters",
        started.elapsed().as_secs_f64(),
        stats["accepted"],
        stats["coalesced"],
        sandbox.stats().requests_total,
        stats["delivered"],
        stats["retries"],
        stats["rate_limited"],
        stats["dead"],
    );
    println!(
        "most requests in flight for one message at once: {}",
        check.max_concurrent
    );
    if let Some(summary) = live.summary(&stats) {
        println!("{summary}");
    }
    if !check.bot_messages.is_empty() {
        println!("the bot's messages (state and id from status with wait; what Zoom shows):");
        for line in &check.bot_messages {
            println!("  {line}");
        }
    }
    if args.keep_running {
        println!("daemon and sandbox keep running; Ctrl-C stops them");
        stop.cancelled().await;
    }
    cancel.cancel();
    daemon.await??;
    sandbox.shutdown().await;
    println!("{}", check.verdict());
    Ok(if check.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Moves a finished task's result into `result`, leaving `task` empty; a running task stays.
async fn take_if_finished<T>(
    task: &mut Option<JoinHandle<anyhow::Result<T>>>,
    result: &mut Option<anyhow::Result<T>>,
) -> anyhow::Result<()> {
    if let Some(finished) = task.take_if(|task| task.is_finished()) {
        *result = Some(finished.await?);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
