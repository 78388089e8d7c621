//! Load over the daemon's Unix socket, as producers send it.
//!
//! - The timed intake load of the benches that measure durable acknowledgements (enqueue,
//!   cluster): connections opened round-robin over one or more daemons' sockets, each keeping
//!   a window of requests outstanding and writing every free slot's request in one `write`,
//!   through a warm-up and then a measured interval ([`Clock`]); every acknowledgement is
//!   timed ([`Tally`]). The edits they send ([`push_edit`]) name a message of their own and
//!   carry a `content` of exactly [`CONTENT_BYTES`] of JSON; delivery is held
//!   ([`held_sandbox`]), so only intake is measured.
//! - Pipelined preloads ([`send_all`]): every line on one connection, every answer checked
//!   (drain, cluster).

use std::fmt::Display;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::latency::micros;

/// Size of every intake edit's `content` object, serialized.
pub const CONTENT_BYTES: usize = 1024;

/// A sandbox Zoom whose token endpoint takes an hour: a daemon delivering to it never obtains
/// a token and sends nothing, so what a run measures is intake only.
pub async fn held_sandbox() -> anyhow::Result<Sandbox> {
    let sandbox = Sandbox::start(SandboxConfig::default())
        .await
        .context("cannot start the sandbox")?;
    sandbox.set_token_delay(Duration::from_secs(3600));
    Ok(sandbox)
}

/// The measured interval, shared by every connection of a run.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub measure_from: Instant,
    pub until: Instant,
}

/// An end of the measured interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Start,
    End,
}

impl Clock {
    /// `warmup` seconds of load from now, then `seconds` measured.
    pub fn after_warmup(warmup: f64, seconds: f64) -> Clock {
        let measure_from = Instant::now() + Duration::from_secs_f64(warmup);
        Clock {
            measure_from,
            until: measure_from + Duration::from_secs_f64(seconds),
        }
    }

    /// Calls `at` when the measured interval starts and when it ends, on a task of its own;
    /// the task returns both results.
    pub fn at_bounds<T: Send + 'static>(
        self,
        mut at: impl FnMut(Bound) -> T + Send + 'static,
    ) -> JoinHandle<(T, T)> {
        tokio::spawn(async move {
            tokio::time::sleep_until(self.measure_from.into()).await;
            let start = at(Bound::Start);
            tokio::time::sleep_until(self.until.into()).await;
            (start, at(Bound::End))
        })
    }
}

/// What the connections of a run saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// From just before a request was written to when its answer line had been read, for the
    /// acknowledged requests written inside the measured interval (whose answers may come
    /// after it); in the order they came, unsorted.
    pub latencies_us: Vec<u32>,
    /// Acknowledgements read inside the measured interval.
    pub acked_measured: u64,
    /// Acknowledgements over the whole run, warm-up and the last answers after it included.
    pub acked_total: u64,
    /// Answers other than `ok:true`, and the first of them.
    pub errors: u64,
    pub first_error: Option<String>,
    /// `coalesced:true` answers.
    pub coalesced: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.acked_measured += other.acked_measured;
        self.acked_total += other.acked_total;
        self.errors += other.errors;
        self.coalesced += other.coalesced;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Opens `connections` connections, connection `c` to `sockets[c % sockets.len()]`.
pub async fn connect(sockets: &[PathBuf], connections: usize) -> anyhow::Result<Vec<UnixStream>> {
    let mut streams = Vec::with_capacity(connections);
    for conn in 0..connections {
        let socket = &sockets[conn % sockets.len()];
        streams.push(
            UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?,
        );
    }
    Ok(streams)
}

/// Drives every connection, each on a task of its own, until `clock.until` and the answers to
/// what it wrote before then; returns what they saw, added up. Connection `c` (the index in
/// `streams`) writes the requests `requests(c)` appends to a batch: request `seq` for `seq`
/// from 0 on.
pub async fn drive_all<W>(
    streams: Vec<UnixStream>,
    window: usize,
    clock: Clock,
    mut requests: impl FnMut(usize) -> W,
) -> anyhow::Result<Tally>
where
    W: FnMut(&mut Vec<u8>, u64) + Send + 'static,
{
    anyhow::ensure!(window >= 1, "a window of at least one request");
    let mut tasks = Vec::with_capacity(streams.len());
    for (conn, stream) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(drive(
            conn,
            stream,
            window,
            clock,
            requests(conn),
        )));
    }
    let mut total = Tally::default();
    for task in tasks {
        total.add(task.await??);
    }
    Ok(total)
}

/// Drives one connection: the writer keeps up to `window` requests outstanding and writes every
/// free slot's request in one `write`; the reader matches answers (which come in order) to
/// their send times, which the writer queues *before* writing so the reader never waits for one.
async fn drive(
    conn: usize,
    stream: UnixStream,
    window: usize,
    clock: Clock,
    mut push_request: impl FnMut(&mut Vec<u8>, u64),
) -> anyhow::Result<Tally> {
    const COALESCED: &[u8] = b"\"coalesced\":true";
    let (reader, mut writer) = stream.into_split();
    let slots = Semaphore::new(window);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();

    let write_side = async {
        let mut seq = 0u64;
        let mut batch = Vec::new();
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
                push_request(&mut batch, seq);
                seq += 1;
                let _ = sent_tx.send(sent_at);
            }
            writer.write_all(&batch).await?;
        }
        // Closing the channel tells the reader to stop after the outstanding answers.
        drop(sent_tx);
        anyhow::Ok(())
    };

    let read_side = async {
        let mut tally = Tally::default();
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
                tally.acked_total += 1;
                if now >= clock.measure_from && now < clock.until {
                    tally.acked_measured += 1;
                }
                if sent_at >= clock.measure_from {
                    tally.latencies_us.push(micros(now - sent_at));
                }
                if line.windows(COALESCED.len()).any(|w| w == COALESCED) {
                    tally.coalesced += 1;
                }
            } else {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(String::from_utf8_lossy(&line).trim().to_string());
                }
            }
        }
        anyhow::Ok(tally)
    };

    let ((), tally) = tokio::try_join!(write_side, read_side)?;
    Ok(tally)
}

/// Appends one edit request line: message `bench-{conn}-{seq}` of `account`, and a `content`
/// of exactly [`CONTENT_BYTES`] bytes. Every piece is plain ASCII needing no JSON escaping
/// (`account` must be too).
pub fn push_edit(out: &mut Vec<u8>, conn: usize, seq: u64, account: impl Display) {
    const HEAD: &str = r#"{"head":{"text":"Build status"},"body":[{"type":"message","text":""#;
    const TAIL: &str = r#""}]}"#;
    const FILLER: &[u8] = b"step 3 of 7 done, all checks green; ";
    write!(
        out,
        r#"{{"op":"edit","message_id":"bench-{conn}-{seq}","account_id":"{account}","robot_jid":"bench-bot@xmpp.zoom.us","content":{HEAD}"#
    )
    .expect("writing to a Vec");
    let text_len = CONTENT_BYTES - HEAD.len() - TAIL.len();
    out.extend(FILLER.iter().cycle().take(text_len));
    out.extend_from_slice(TAIL.as_bytes());
    out.extend_from_slice(b"}\n");
}

/// The request line of edit `seq` of connection `conn`, for `account`.
pub fn request_line(conn: usize, seq: u64, account: impl Display) -> Vec<u8> {
    let mut line = Vec::new();
    push_edit(&mut line, conn, seq, account);
    line
}

/// Checks once that a request line for `account` is valid JSON with a content of
/// [`CONTENT_BYTES`] bytes; returns the length of the line checked (edit 17 of connection 3).
pub fn check_request_shape(account: impl Display) -> anyhow::Result<usize> {
    let line = request_line(3, 17, account);
    let value: serde_json::Value = serde_json::from_slice(&line)?;
    anyhow::ensure!(value["message_id"] == "bench-3-17" && line.ends_with(b"}\n"));
    let content = value["content"].to_string().len();
    anyhow::ensure!(content == CONTENT_BYTES, "content is {content} bytes");
    Ok(line.len())
}

/// Writes every line over one connection to `socket` (in batches of about 64 KiB) while
/// reading the answers, and checks that every answer is `ok`.
pub async fn send_all(
    socket: &Path,
    lines: impl IntoIterator<Item = Vec<u8>>,
) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<()>();
    let reading = tokio::spawn(async move {
        let mut answers = BufReader::new(reader).lines();
        while sent_rx.recv().await.is_some() {
            let line = answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            anyhow::ensure!(line.starts_with(r#"{"ok":true"#), "edit refused: {line}");
        }
        anyhow::Ok(())
    });
    let mut batch = Vec::new();
    for line in lines {
        batch.extend(line);
        let _ = sent_tx.send(());
        if batch.len() >= 64 * 1024 {
            writer.write_all(&batch).await?;
            batch.clear();
        }
    }
    writer.write_all(&batch).await?;
    drop(sent_tx);
    reading.await?
}
