//! `hot`: 20 messages of one Pro account edited 50 times a second each (1,000 edits/s) for
//! `--seconds`: coalescing keeps requests at the account's limit, and the sandbox's messages
//! (polled every `--poll-ms`) show how long an acknowledged edit takes to reach Zoom, that
//! every message ends on its last acknowledged edit, and that no message ever goes back to an
//! older content or has two requests in flight.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use zoomq::plan::Plan;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::measure::{ms, percentile, secs, Counts, Log, WindowMax};
use crate::report::{loadavg, print_targets, Target};
use crate::rig::{content_seq, edit_line, seq_content, Rig, ACCOUNT};
use crate::Args;

const HOT_MESSAGES: usize = 20;
const HOT_EDITS_PER_MESSAGE: u32 = 50;
/// How long the queue may take to empty after the producer stops before we call it stuck.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// An edit the daemon acknowledged: which hot message, its sequence number, when the ack was read.
struct Acked {
    message: usize,
    seq: u64,
    at: Instant,
}

pub async fn hot(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(30.0);
    let rate = HOT_EDITS_PER_MESSAGE * HOT_MESSAGES as u32;
    let poll = Duration::from_millis(args.poll_ms.max(1));
    println!(
        "\n== hot: {HOT_MESSAGES} messages x {HOT_EDITS_PER_MESSAGE} edits/s = {rate} edits/s for {seconds} s, one Pro account; sandbox polled every {} ms",
        poll.as_millis()
    );
    let rig = Rig::start(SandboxConfig::default(), |_| {}).await?;
    let ids: Vec<String> = (0..HOT_MESSAGES).map(|m| format!("hot-{m}")).collect();

    // The watcher runs until the producer has finished and the queue is empty; the guard stops
    // it also when producing fails, so the join below cannot hang.
    let stop = CancellationToken::new();
    let watching = watch(&rig.sandbox, &ids, poll, stop.clone());
    let driving = async {
        let _stop = stop.clone().drop_guard();
        let started = Instant::now();
        let acked = produce_hot(&rig.socket, &ids, rate, secs(seconds)).await?;
        let produced = Instant::now();
        let drained = rig.wait_drained(DRAIN_TIMEOUT).await?;
        // One more poll period so the watcher sees the final contents.
        tokio::time::sleep(poll * 2).await;
        anyhow::Ok((acked, started, produced, drained))
    };
    let (watched, driven) = tokio::join!(watching, driving);
    let (acked, started, produced, drained) = driven?;
    let stats = rig.stats().await?;

    // Lag: for each acked edit, the first poll showing its content or a later one.
    let mut lags = Vec::with_capacity(acked.len());
    let mut unresolved = 0u64;
    for edit in &acked {
        let seen = &watched.first_seen[edit.message];
        let index = seen.partition_point(|(seq, _)| *seq < edit.seq);
        match seen.get(index) {
            Some((_, at)) => lags.push(at.saturating_duration_since(edit.at)),
            None => unresolved += 1,
        }
    }
    lags.sort_unstable();
    let mut wrong = Vec::new();
    let mut max_concurrent = 0;
    for (m, id) in ids.iter().enumerate() {
        let last_acked = acked.iter().rev().find(|a| a.message == m).map(|a| a.seq);
        let record = rig.sandbox.message(id);
        let shown = record
            .as_ref()
            .and_then(|r| r.content.as_ref())
            .and_then(content_seq);
        max_concurrent = max_concurrent.max(record.map_or(0, |r| r.max_concurrent));
        if shown != last_acked {
            wrong.push(format!("{id}: shows {shown:?}, last acked {last_acked:?}"));
        }
    }
    let producing = (produced - started).as_secs_f64();
    let log = Log::read(&rig.sandbox);
    rig.stop().await?;
    let arrivals = log.arrivals(ACCOUNT);
    let window = Counts::of(arrivals, log.offset(started), log.offset(produced));
    let rate_limited = arrivals.iter().filter(|a| a.status == Some(429)).count();
    let offsets: Vec<Duration> = arrivals.iter().map(|a| a.offset).collect();
    let windows = WindowMax::of(&offsets, log.wall_phase);
    let limit = Plan::Pro.per_second();

    let requests_per_second = window.requests as f64 / producing;
    // A full round of the hot messages at the limit, plus a second.
    let lag_target = HOT_MESSAGES as f64 / f64::from(limit) + 1.0;
    let (p50, p99, max) = (
        ms(percentile(&lags, 50.0)),
        ms(percentile(&lags, 99.0)),
        ms(lags.last().copied().unwrap_or_default()),
    );
    println!(
        "{:>8} {:>7} {:>9} {:>8} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "edits/s",
        "acked",
        "coalesced",
        "req/s",
        "429",
        "fixed",
        "wall",
        "sliding",
        "p50 ms",
        "p99 ms",
        "max ms",
        "drain s"
    );
    println!(
        "{:>8.0} {:>7} {:>9} {:>8.2} {:>6} {:>6} {:>6} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>10.2}",
        acked.len() as f64 / producing,
        acked.len(),
        stats["coalesced"].as_u64().unwrap_or(0),
        requests_per_second,
        rate_limited,
        windows.sandbox_fixed,
        windows.wall_fixed,
        windows.sliding,
        p50,
        p99,
        max,
        drained.as_secs_f64(),
    );
    println!(
        "(req/s: edit requests at the sandbox while producing; lag: ack read by the producer -> first poll showing that content or a later one; {} polls, one per {:.2} ms on average)",
        watched.polls,
        watched.elapsed.as_secs_f64() * 1000.0 / watched.polls.max(1) as f64
    );
    for line in &wrong {
        println!("  MISMATCH {line}");
    }
    let targets = vec![
        Target::new(
            "every message ends on its last acknowledged edit",
            "all 20",
            format!("{} of {HOT_MESSAGES}", HOT_MESSAGES - wrong.len()),
            wrong.is_empty(),
        ),
        Target::new(
            "ack-to-Zoom lag p99",
            format!("< {:.2} s", lag_target),
            format!(
                "{:.3} s (p50 {:.3} s, max {:.3} s, {} unresolved)",
                p99 / 1e3,
                p50 / 1e3,
                max / 1e3,
                unresolved
            ),
            p99 / 1e3 < lag_target && unresolved == 0,
        ),
        Target::new(
            "requests at the sandbox: per second, most in a 1 s window (sandbox-fixed / wall-clock / any phase / sliding)",
            format!("<= {limit}/s; <= {limit}"),
            format!(
                "{requests_per_second:.2}/s; {} / {} / {} / {}",
                windows.sandbox_fixed, windows.wall_fixed, windows.any_phase_fixed, windows.sliding
            ),
            windows.worst() <= limit,
        ),
        Target::new(
            "never two requests for one message at once, never an older content after a newer",
            "1 / 0",
            format!("{max_concurrent} / {}", watched.regressions),
            max_concurrent <= 1 && watched.regressions == 0,
        ),
    ];
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "hot", "machine": machine, "loadavg": loadavg(), "seconds": seconds,
        "messages": HOT_MESSAGES, "offered_edits_per_second": rate,
        "produced_seconds": producing, "acked": acked.len(),
        "coalesced": stats["coalesced"], "delivered": stats["delivered"],
        "window": window, "requests_per_second": requests_per_second,
        "rate_limited_total": rate_limited, "windows": windows,
        "lag_ms": {"p50": p50, "p99": p99, "max": max, "samples": lags.len(), "unresolved": unresolved},
        "poll_ms": poll.as_millis() as u64, "polls": watched.polls, "regressions": watched.regressions,
        "max_concurrent": max_concurrent, "wrong": wrong, "drain_seconds": drained.as_secs_f64(),
        "targets": targets,
    });
    println!("{line}");
    Ok(())
}

/// Edits `ids` round-robin, `rate` edits a second in all, over one pipelined connection, for
/// `duration`; returns every acknowledged edit with the instant its answer was read.
async fn produce_hot(
    socket: &Path,
    ids: &[String],
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Vec<Acked>> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    // Answers come in request order, so the reader pairs each with the next sent edit.
    let reading = tokio::spawn(async move {
        let mut answers = BufReader::new(reader).lines();
        let mut acked = Vec::new();
        while let Some((message, seq)) = sent_rx.recv().await {
            let line = answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            let at = Instant::now();
            anyhow::ensure!(line.starts_with(r#"{"ok":true"#), "edit refused: {line}");
            acked.push(Acked { message, seq, at });
        }
        anyhow::Ok(acked)
    });
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    // Catch up after a late tick, so the offered rate is the asked one on average.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut seq = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        let message = seq as usize % ids.len();
        writer
            .write_all(&edit_line(
                ACCOUNT,
                &ids[message],
                &seq_content(&ids[message], seq),
            ))
            .await?;
        let _ = sent_tx.send((message, seq));
        seq += 1;
    }
    drop(sent_tx);
    reading.await?
}

/// What polling the sandbox's messages saw.
struct Watched {
    /// Per message: each newer sequence number shown, with the first poll that showed it.
    first_seen: Vec<Vec<(u64, Instant)>>,
    /// Polls in which a message showed an older sequence number than before (must be 0).
    regressions: u64,
    polls: u64,
    elapsed: Duration,
}

async fn watch(
    sandbox: &Sandbox,
    ids: &[String],
    period: Duration,
    stop: CancellationToken,
) -> Watched {
    let mut watched = Watched {
        first_seen: vec![Vec::new(); ids.len()],
        regressions: 0,
        polls: 0,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        for (m, id) in ids.iter().enumerate() {
            let Some(seq) = sandbox
                .message(id)
                .and_then(|r| r.content.as_ref().and_then(content_seq))
            else {
                continue;
            };
            // Taken after the read: the content was shown no later than this.
            let now = Instant::now();
            let seen = &mut watched.first_seen[m];
            match seen.last() {
                Some((last, _)) if seq < *last => watched.regressions += 1,
                Some((last, _)) if seq == *last => {}
                _ => seen.push((seq, now)),
            }
        }
        watched.polls += 1;
    }
    watched.elapsed = started.elapsed();
    watched
}
