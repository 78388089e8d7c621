//! Fill: the producers. `--connections` connections, each keeping `--window` requests
//! outstanding, send `--edits` edits of distinct messages round-robin over `--accounts`
//! accounts, each with a `content` of exactly `--content-bytes` bytes of JSON.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::report::round2;
use crate::{proc, Args};

#[derive(Debug, Clone, Serialize)]
pub struct Fill {
    pub acked: u64,
    pub seconds: f64,
    pub rate: f64,
    /// Sum of the request lines' lengths, newline included: what the producers sent.
    pub request_bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// `[share acknowledged, seconds, VmRSS MB]` at every tenth of the fill.
    pub rss_by_progress: Vec<[f64; 3]>,
}

/// What each edit looks like.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Fill number: 0 for the first fill, then the cycle whose refill this is.
    round: u32,
    connections: u64,
    accounts: u64,
    edits: u64,
    content_bytes: usize,
}

/// Message `index` of fill `round`.
pub fn message_id(round: u32, index: u64) -> String {
    format!("m{round}-{index}")
}

pub fn account_id(index: u64) -> String {
    format!("acct-{index}")
}

/// Enqueues `--edits` edits of fill `round` into the running daemon.
pub async fn fill_queue(args: &Args, daemon: &Daemon, round: u32) -> anyhow::Result<Fill> {
    let shape = Shape {
        round,
        connections: args.connections,
        accounts: args.accounts,
        edits: args.edits,
        content_bytes: args.content_bytes,
    };
    check_shape(shape)?;
    let mut streams = Vec::new();
    for _ in 0..args.connections {
        streams.push(UnixStream::connect(&daemon.process.socket).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let started = Instant::now();
    let sampler = tokio::spawn(sample_progress(
        daemon.pid()?,
        acked.clone(),
        args.edits,
        started,
        done.clone(),
    ));
    let mut tasks = Vec::new();
    for (conn, stream) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(produce(
            stream,
            conn as u64,
            shape,
            args.window,
            acked.clone(),
        )));
    }
    let mut errors = 0;
    let mut first_error = None;
    let mut request_bytes = 0;
    for task in tasks {
        let outcome = task.await??;
        errors += outcome.errors;
        request_bytes += outcome.bytes;
        first_error = first_error.or(outcome.first_error);
    }
    let seconds = started.elapsed().as_secs_f64();
    done.cancel();
    let rss_by_progress = sampler.await?;
    let acked = acked.load(Ordering::Relaxed);
    Ok(Fill {
        acked,
        seconds,
        rate: acked as f64 / seconds,
        request_bytes,
        errors,
        first_error,
        rss_by_progress,
    })
}

/// What one connection sent and was refused.
struct Produced {
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

/// One connection: edits `conn`, `conn + connections`, ... with up to `window` outstanding,
/// every free slot's requests written at once.
async fn produce(
    stream: UnixStream,
    conn: u64,
    shape: Shape,
    window: usize,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<Produced> {
    let total = if conn < shape.edits {
        (shape.edits - conn).div_ceil(shape.connections)
    } else {
        0
    };
    let (reader, mut writer) = stream.into_split();
    let slots = Semaphore::new(window);
    let write_side = async {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        let mut batch = Vec::new();
        while sent < total {
            slots.acquire().await?.forget();
            let extra = (slots.available_permits() as u64).min(total - sent - 1);
            if extra > 0 {
                slots.try_acquire_many(extra as u32)?.forget();
            }
            batch.clear();
            for _ in 0..=extra {
                push_edit(&mut batch, shape, conn + sent * shape.connections);
                sent += 1;
            }
            bytes += batch.len() as u64;
            writer.write_all(&batch).await?;
        }
        anyhow::Ok(bytes)
    };
    let read_side = async {
        let mut answers = BufReader::with_capacity(64 * 1024, reader);
        let mut line = Vec::with_capacity(256);
        let mut errors = 0u64;
        let mut first_error = None;
        for _ in 0..total {
            line.clear();
            if answers.read_until(b'\n', &mut line).await? == 0 {
                anyhow::bail!("the daemon closed connection {conn}");
            }
            slots.add_permits(1);
            if line.starts_with(b"{\"ok\":true") {
                acked.fetch_add(1, Ordering::Relaxed);
            } else {
                errors += 1;
                first_error.get_or_insert_with(|| String::from_utf8_lossy(&line).into_owned());
            }
        }
        anyhow::Ok((errors, first_error))
    };
    let (bytes, (errors, first_error)) = tokio::try_join!(write_side, read_side)?;
    Ok(Produced {
        bytes,
        errors,
        first_error,
    })
}

/// Appends the request line of edit `index`: message [`message_id`] on account
/// `acct-<index % accounts>`, whose content names the message (so a delivery can be checked)
/// and is padded to exactly `content_bytes`.
fn push_edit(out: &mut Vec<u8>, shape: Shape, index: u64) {
    const FILLER: &[u8] = b"step 3 of 7 done, all checks green; ";
    let message = message_id(shape.round, index);
    let head = format!(r#"{{"head":{{"text":"{message}"}},"body":[{{"type":"message","text":""#);
    const TAIL: &str = r#""}]}"#;
    write!(
        out,
        r#"{{"op":"edit","message_id":"{message}","account_id":"{}","robot_jid":"scale-bot@xmpp.zoom.us","content":{head}"#,
        account_id(index % shape.accounts)
    )
    .expect("writing to a Vec");
    let filler = shape.content_bytes.saturating_sub(head.len() + TAIL.len());
    out.extend(FILLER.iter().cycle().take(filler));
    out.extend_from_slice(TAIL.as_bytes());
    out.extend_from_slice(b"}\n");
}

fn check_shape(shape: Shape) -> anyhow::Result<()> {
    let mut line = Vec::new();
    push_edit(&mut line, shape, shape.edits - 1);
    let value: Value = serde_json::from_slice(&line)?;
    let content = value["content"].to_string().len();
    anyhow::ensure!(
        content == shape.content_bytes,
        "content is {content} bytes, not {}",
        shape.content_bytes
    );
    Ok(())
}

/// Samples the daemon's VmRSS at every tenth of the fill until `done`.
async fn sample_progress(
    pid: u32,
    acked: Arc<AtomicU64>,
    edits: u64,
    started: Instant,
    done: CancellationToken,
) -> Vec<[f64; 3]> {
    let pid = pid.to_string();
    let mut samples = Vec::new();
    let mut next_tenth = 1;
    loop {
        let finished = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            _ = done.cancelled() => true,
        };
        let count = acked.load(Ordering::Relaxed);
        if count * 10 >= next_tenth * edits || finished {
            let rss = proc::status_bytes(&pid, "VmRSS:") as f64 / 1e6;
            let share = count as f64 / edits as f64;
            samples.push([
                round2(share),
                round2(started.elapsed().as_secs_f64()),
                rss.round(),
            ]);
            while next_tenth <= 10 && count * 10 >= next_tenth * edits {
                next_tenth += 1;
            }
        }
        if finished {
            return samples;
        }
    }
}
