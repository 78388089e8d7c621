//! `idle`: `--samples` edits one at a time on an empty queue (Pro): from the producer's write
//! to the sandbox's receipt of the PUT (`RequestRecord::at`, same process, same clock), and to
//! the producer reading the ack.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use zoomq::sandbox::SandboxConfig;

use crate::measure::{ms, percentile};
use crate::report::{loadavg, print_targets, Target};
use crate::rig::{edit_line, seq_content, Rig, ACCOUNT};
use crate::Args;

/// Edits sent before measuring: they fetch the token and open the HTTP connection.
const IDLE_WARMUP: usize = 5;

pub async fn idle(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let samples = args.samples.max(1);
    // Spacing after each arrival, longer than the Pro pacing interval (1/20 s = 50 ms), so
    // no edit waits for the limiter: the figure is the idle path, not pacing.
    let gap = Duration::from_millis(60);
    println!(
        "\n== idle: {samples} edits one at a time on an empty queue (Pro), {} ms after the previous one reached the sandbox",
        gap.as_millis()
    );
    let rig = Rig::start(SandboxConfig::default(), |_| {}).await?;
    let stream = UnixStream::connect(&rig.socket).await?;
    let (reader, mut writer) = stream.into_split();
    let mut answers = BufReader::new(reader).lines();
    let mut to_request = Vec::with_capacity(samples);
    let mut to_ack = Vec::with_capacity(samples);
    let mut before_ack = 0usize;
    for i in 0..IDLE_WARMUP + samples {
        tokio::time::sleep(gap).await;
        let id = format!("idle-{i}");
        let line = edit_line(ACCOUNT, &id, &seq_content(&id, i as u64));
        // The log then holds this edit's request only.
        rig.sandbox.clear_requests();
        let written = Instant::now();
        writer.write_all(&line).await?;
        let answer = answers
            .next_line()
            .await?
            .context("the daemon closed the connection")?;
        let acked = Instant::now();
        anyhow::ensure!(
            answer.starts_with(r#"{"ok":true"#),
            "edit refused: {answer}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let arrived = loop {
            if let Some(record) = rig
                .sandbox
                .requests()
                .into_iter()
                .find(|r| r.message_id == id)
            {
                break record.at;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{id} did not reach the sandbox within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if i >= IDLE_WARMUP {
            to_request.push(arrived.saturating_duration_since(written));
            to_ack.push(acked - written);
            before_ack += usize::from(arrived < acked);
        }
    }
    rig.stop().await?;
    to_request.sort_unstable();
    to_ack.sort_unstable();

    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8}",
        "from the write to", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (name, sorted) in [
        ("the PUT at the sandbox", &to_request),
        ("the ack read", &to_ack),
    ] {
        println!(
            "{:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            ms(percentile(sorted, 50.0)),
            ms(percentile(sorted, 90.0)),
            ms(percentile(sorted, 99.0)),
            ms(sorted.last().copied().unwrap_or_default()),
        );
    }
    println!("{before_ack} of {samples} PUTs reached the sandbox before the producer read the edit's ack");
    let p50 = ms(percentile(&to_request, 50.0));
    let targets = vec![Target::new(
        "enqueue-to-request latency p50",
        "< 5 ms",
        format!(
            "{p50:.2} ms (p99 {:.2} ms)",
            ms(percentile(&to_request, 99.0))
        ),
        p50 < 5.0,
    )];
    print_targets(&targets);
    let summary = |sorted: &[Duration]| {
        json!({
            "p50": ms(percentile(sorted, 50.0)), "p90": ms(percentile(sorted, 90.0)),
            "p99": ms(percentile(sorted, 99.0)), "max": ms(sorted.last().copied().unwrap_or_default()),
        })
    };
    let line = json!({
        "bench": "drain", "scenario": "idle", "machine": machine, "loadavg": loadavg(), "samples": samples,
        "gap_ms": gap.as_millis() as u64, "to_request_ms": summary(&to_request),
        "to_ack_ms": summary(&to_ack), "request_before_ack": before_ack, "targets": targets,
    });
    println!("{line}");
    Ok(())
}
