//! The intake's load generator: producer connections to the daemons' Unix sockets, each
//! keeping a window of edit requests outstanding, timing every acknowledgement; and the shape
//! of those edits (a message id of their own, an account, 1 KiB of content).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};

use crate::intake::{micros, CONTENT_BYTES};
use crate::proc;
use crate::rig::cpu_of;

pub type Sample = (Duration, Duration, (Duration, Duration));

/// The load: `connections` connections round-robin over `sockets`, connection `c` editing the
/// accounts of `lists[c % sockets.len()]` in turn; CPU time of the `daemons` and `nats`
/// processes and of the machine sampled at the measured interval's start and end.
#[allow(clippy::too_many_arguments)]
pub async fn generate(
    sockets: Vec<PathBuf>,
    lists: Vec<Vec<usize>>,
    connections: usize,
    window: usize,
    warmup: f64,
    seconds: f64,
    daemons: Vec<String>,
    nats: Vec<String>,
) -> anyhow::Result<(ConnReport, Sample, Sample)> {
    let mut streams = Vec::with_capacity(connections);
    for conn in 0..connections {
        let socket = &sockets[conn % sockets.len()];
        streams.push(
            UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?,
        );
    }
    let measure_from = Instant::now() + Duration::from_secs_f64(warmup);
    let clock = Clock {
        measure_from,
        until: measure_from + Duration::from_secs_f64(seconds),
    };
    let sampler = tokio::spawn(async move {
        let sample = || (cpu_of(&daemons), cpu_of(&nats), proc::machine_cpu());
        tokio::time::sleep_until(clock.measure_from.into()).await;
        let start = sample();
        tokio::time::sleep_until(clock.until.into()).await;
        (start, sample())
    });
    let mut tasks = Vec::with_capacity(streams.len());
    for (conn, stream) in streams.into_iter().enumerate() {
        let list = lists[conn % sockets.len()].clone();
        anyhow::ensure!(
            !list.is_empty(),
            "daemon {} owns no account",
            conn % sockets.len()
        );
        tasks.push(tokio::spawn(drive(conn, stream, window, clock, list)));
    }
    let mut total = ConnReport::default();
    for task in tasks {
        let conn = task.await??;
        total.latencies_us.extend(conn.latencies_us);
        total.acked_measured += conn.acked_measured;
        total.errors += conn.errors;
        total.coalesced += conn.coalesced;
        if total.first_error.is_none() {
            total.first_error = conn.first_error;
        }
    }
    let (start, end) = sampler.await?;
    Ok((total, start, end))
}

/// The measured interval, shared by every connection of a run.
#[derive(Debug, Clone, Copy)]
struct Clock {
    measure_from: Instant,
    until: Instant,
}

#[derive(Debug, Default)]
pub struct ConnReport {
    pub latencies_us: Vec<u32>,
    pub acked_measured: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub coalesced: u64,
}

/// Drives one connection: the writer keeps up to `window` requests outstanding; the reader
/// matches answers (which come in order) to their send times, queued before each write.
async fn drive(
    conn: usize,
    stream: UnixStream,
    window: usize,
    clock: Clock,
    accounts: Vec<usize>,
) -> anyhow::Result<ConnReport> {
    let (reader, mut writer) = stream.into_split();
    let slots = Semaphore::new(window);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();

    let write_side = async {
        let mut seq = 0u64;
        let mut batch = Vec::with_capacity(window * (CONTENT_BYTES + 256));
        loop {
            slots.acquire().await?.forget();
            let extra = slots.available_permits();
            if extra > 0 {
                slots.try_acquire_many(extra as u32)?.forget();
            }
            let sent_at = Instant::now();
            if sent_at >= clock.until {
                break;
            }
            batch.clear();
            for _ in 0..=extra {
                let account = accounts[(seq as usize * 64 + conn) % accounts.len()];
                push_request(&mut batch, conn, seq, account);
                seq += 1;
                let _ = sent_tx.send(sent_at);
            }
            writer.write_all(&batch).await?;
        }
        drop(sent_tx);
        anyhow::Ok(())
    };

    let read_side = async {
        let mut report = ConnReport::default();
        let mut answers = BufReader::with_capacity(64 * 1024, reader);
        let mut line = Vec::with_capacity(256);
        while let Some(sent_at) = sent_rx.recv().await {
            line.clear();
            if answers.read_until(b'\n', &mut line).await? == 0 {
                anyhow::bail!("the daemon closed connection {conn}");
            }
            let now = Instant::now();
            slots.add_permits(1);
            if line.starts_with(b"{\"ok\":true") {
                if now >= clock.measure_from && now < clock.until {
                    report.acked_measured += 1;
                }
                if sent_at >= clock.measure_from {
                    report.latencies_us.push(micros(now - sent_at));
                }
                if line.windows(16).any(|w| w == b"\"coalesced\":true") {
                    report.coalesced += 1;
                }
            } else {
                report.errors += 1;
                if report.first_error.is_none() {
                    report.first_error = Some(String::from_utf8_lossy(&line).trim().to_string());
                }
            }
        }
        anyhow::Ok(report)
    };

    let ((), report) = tokio::try_join!(write_side, read_side)?;
    Ok(report)
}

/// The name of account number `n`.
pub fn account_id(n: usize) -> String {
    format!("acct-{n:05}")
}

/// Appends edit `seq` of connection `conn`: a message id of its own, account number
/// `account`, and a `content` of exactly [`CONTENT_BYTES`] bytes (plain ASCII, no escaping).
pub fn push_request(out: &mut Vec<u8>, conn: usize, seq: u64, account: usize) {
    const HEAD: &str = r#"{"head":{"text":"Build status"},"body":[{"type":"message","text":""#;
    const TAIL: &str = r#""}]}"#;
    const FILLER: &[u8] = b"step 3 of 7 done, all checks green; ";
    write!(
        out,
        r#"{{"op":"edit","message_id":"bench-{conn}-{seq}","account_id":"acct-{account:05}","robot_jid":"bench-bot@xmpp.zoom.us","content":{HEAD}"#
    )
    .expect("writing to a Vec");
    let text_len = CONTENT_BYTES - HEAD.len() - TAIL.len();
    out.extend(FILLER.iter().cycle().take(text_len));
    out.extend_from_slice(TAIL.as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Checks once that a request line is valid JSON with a content of [`CONTENT_BYTES`] bytes;
/// returns the line's length.
pub fn check_request_shape() -> anyhow::Result<usize> {
    let mut line = Vec::new();
    push_request(&mut line, 3, 17, 1000);
    let value: serde_json::Value = serde_json::from_slice(&line)?;
    anyhow::ensure!(value["message_id"] == "bench-3-17" && line.ends_with(b"}\n"));
    let content = value["content"].to_string().len();
    anyhow::ensure!(content == CONTENT_BYTES, "content is {content} bytes");
    Ok(line.len())
}
