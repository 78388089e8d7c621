//! The producer side: the Unix-socket accept loop and one [`Handler`] per connection, speaking
//! the line protocol of [`crate::protocol`]. An edit is answered only after
//! [`Queue::enqueue`] reports it durable.
//!
//! Isolation between producers is the point of most of this file:
//! - connections are capped by a semaphore (`socket.max_connections`); clients beyond it wait
//!   in the kernel's listen backlog instead of costing memory;
//! - a line longer than `socket.max_line_bytes` is answered `too_large` and skipped without
//!   being buffered, so a 100 MiB line costs at most one line's worth of memory;
//! - each connection processes at most `socket.max_pipelined` requests at once and stops
//!   reading while they are outstanding (backpressure on that connection only);
//! - a client that does not read its answers is dropped after `socket.write_timeout`, and an
//!   idle one after `socket.idle_timeout`. Edits it had acknowledged stay durable.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Queue;
use crate::config::SocketConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, ProtocolError, Request};
use crate::queue::EnqueueError;

/// The answer to a request the queue refused.
fn refused(error: EnqueueError) -> ProtocolError {
    let code = match &error {
        EnqueueError::Full(_) | EnqueueError::TooManyRefs(_) => ErrorCode::QueueFull,
        EnqueueError::Unavailable(_) => ErrorCode::Unavailable,
        EnqueueError::NotFound(_) => ErrorCode::NotFound,
        EnqueueError::Gone(_) => ErrorCode::Gone,
        EnqueueError::TooLarge(_) => ErrorCode::TooLarge,
    };
    ProtocolError::new(code, error.to_string())
}

/// What every connection handler shares.
pub struct Ingest {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub config: SocketConfig,
}

/// One frame read from a connection.
enum Frame {
    Line(Bytes),
    /// A line over the limit; the codec skips the rest of it.
    TooLong,
}

/// Newline-delimited frames with a length cap, turning an over-long line into a frame of its
/// own instead of an error (tokio-util's codecs end the stream on errors).
struct LineCodec(AnyDelimiterCodec);

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        map_frame(self.0.decode(buf))
    }
    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        map_frame(self.0.decode_eof(buf))
    }
}

fn map_frame(
    result: Result<Option<Bytes>, AnyDelimiterCodecError>,
) -> Result<Option<Frame>, std::io::Error> {
    match result {
        Ok(frame) => Ok(frame.map(Frame::Line)),
        Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => Ok(Some(Frame::TooLong)),
        Err(AnyDelimiterCodecError::Io(e)) => Err(e),
    }
}

impl Ingest {
    /// Accepts producers until `cancel` fires. Connection tasks are spawned on `tracker`, so
    /// shutdown can wait for their outstanding answers: on `cancel` each connection stops
    /// reading, answers what it already read and closes; on `abort` it closes at once, its
    /// outstanding requests unanswered (an edit not answered may or may not be accepted, as
    /// after a crash; it is never answered `ok` unless it is durable).
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        cancel: CancellationToken,
        abort: CancellationToken,
        tracker: TaskTracker,
    ) {
        let limit = Arc::new(Semaphore::new(self.config.max_connections));
        loop {
            // Take a connection slot before accepting, so that excess clients queue in the
            // kernel's backlog rather than in our memory.
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
                _ = cancel.cancelled() => return,
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accepting a producer connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = cancel.cancelled() => return,
            };
            let ingest = self.clone();
            let cancel = cancel.clone();
            let abort = abort.clone();
            tracker.spawn(async move {
                ingest.metrics.ingest_connections_total.inc();
                ingest.metrics.ingest_connections.inc();
                tokio::select! {
                    ended = ingest.handle_connection(stream, cancel) => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "producer connection ended with an error");
                        }
                    }
                    // Dropping the handler closes the socket: the producer sees the
                    // connection end, with every answer it got true.
                    _ = abort.cancelled() => {
                        tracing::debug!("closing a producer connection whose answers were not all sent");
                    }
                }
                ingest.metrics.ingest_connections.dec();
                drop(permit);
            });
        }
    }

    /// Whether the peer may use the socket, per `socket.allowed_uids` / `allowed_gids`.
    fn peer_allowed(&self, stream: &UnixStream) -> Result<(), String> {
        let (uids, gids) = (&self.config.allowed_uids, &self.config.allowed_gids);
        if uids.is_empty() && gids.is_empty() {
            return Ok(());
        }
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        if uids.contains(&cred.uid()) || gids.contains(&cred.gid()) {
            Ok(())
        } else {
            Err(format!(
                "uid {} / gid {} may not use this socket (socket.allowed_uids, socket.allowed_gids)",
                cred.uid(),
                cred.gid()
            ))
        }
    }

    async fn handle_connection(
        self: &Arc<Self>,
        stream: UnixStream,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        if let Err(reason) = self.peer_allowed(&stream) {
            tracing::warn!(%reason, "refused a producer connection");
            self.metrics.ingest_rejected_connections.inc();
            let (_, mut writer) = stream.into_split();
            let line = ProtocolError::new(ErrorCode::Forbidden, reason).to_line() + "\n";
            let _ =
                tokio::time::timeout(self.config.write_timeout, writer.write_all(line.as_bytes()))
                    .await;
            return Ok(());
        }
        let (reader, mut writer) = stream.into_split();
        let codec = LineCodec(AnyDelimiterCodec::new_with_max_length(
            b"\n".to_vec(),
            b"\n".to_vec(),
            self.config.max_line_bytes,
        ));
        let mut frames = FramedRead::with_capacity(reader, codec, 8 * 1024);
        let mut outstanding = FuturesOrdered::new();
        let mut out = Vec::with_capacity(4096);
        let mut reading = true;
        let idle = self.config.idle_timeout;
        loop {
            if !reading && outstanding.is_empty() {
                return Ok(());
            }
            let can_read = reading && outstanding.len() < self.config.max_pipelined;
            let busy = !outstanding.is_empty();
            let idle_sleep = async move {
                if idle.is_zero() || busy {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(idle).await
                }
            };
            tokio::select! {
                // Answers first: they free pipelining slots and reach the client sooner.
                biased;
                Some(answer) = outstanding.next(), if !outstanding.is_empty() => {
                    let answer: String = answer;
                    out.extend_from_slice(answer.as_bytes());
                    out.push(b'\n');
                    // Gather every other answer that is already done into the same write.
                    while let Some(Some(answer)) = outstanding.next().now_or_never() {
                        let answer: String = answer;
                        out.extend_from_slice(answer.as_bytes());
                        out.push(b'\n');
                    }
                    match tokio::time::timeout(self.config.write_timeout, writer.write_all(&out)).await {
                        Ok(result) => result?,
                        Err(_) => {
                            tracing::warn!("dropping a producer that does not read its answers");
                            return Ok(());
                        }
                    }
                    out.clear();
                }
                frame = frames.next(), if can_read => match frame {
                    Some(Ok(frame)) => {
                        let ingest = self.clone();
                        outstanding.push_back(async move { ingest.answer(frame).await });
                    }
                    Some(Err(e)) => return Err(e),
                    None => reading = false,
                },
                _ = cancel.cancelled(), if reading => {
                    // Stop reading; finish and send what was already asked.
                    reading = false;
                }
                _ = idle_sleep, if reading => {
                    tracing::debug!("closing an idle producer connection");
                    return Ok(());
                }
            }
        }
    }

    /// Computes the answer line to one frame.
    async fn answer(&self, frame: Frame) -> String {
        let started = Instant::now();
        let result = match frame {
            Frame::TooLong => Err(ProtocolError::new(
                ErrorCode::TooLarge,
                format!(
                    "request line longer than {} bytes (socket.max_line_bytes); it was skipped",
                    self.config.max_line_bytes
                ),
            )),
            Frame::Line(line) => match protocol::parse_request(&line) {
                Ok(request) => self.execute(request).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok((line, is_edit)) => {
                if is_edit {
                    self.metrics
                        .ack_latency
                        .observe(started.elapsed().as_secs_f64());
                }
                line
            }
            Err(e) => {
                self.metrics
                    .protocol_errors
                    .with_label_values(&[e.code.as_str()])
                    .inc();
                e.to_line()
            }
        }
    }

    /// Runs a valid request. Returns the answer and whether it was an edit.
    async fn execute(&self, request: Request) -> Result<(String, bool), ProtocolError> {
        match request {
            Request::Edit(edit) => {
                let done = self.queue.enqueue(&edit).await.map_err(refused)?;
                Ok((protocol::edit_ok_line(done.job_id, done.coalesced), true))
            }
            Request::Send(send) => {
                let done = self.queue.send(&send).await.map_err(refused)?;
                let line = protocol::send_ok_line(done.job_id, &send.reference, done.coalesced);
                Ok((line, true))
            }
            Request::Delete(delete) => {
                let done = self.queue.delete(&delete).await.map_err(refused)?;
                Ok((protocol::delete_ok_line(done.job_id, done.cancelled), true))
            }
            Request::Status(query) => {
                if query.wait.is_some_and(|w| w > self.config.max_status_wait) {
                    return Err(ProtocolError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "field `wait`: at most {} allowed (socket.max_status_wait)",
                            humantime::format_duration(self.config.max_status_wait)
                        ),
                    ));
                }
                let status = self.queue.status(&query).await.map_err(refused)?;
                Ok((protocol::status_line(&status), false))
            }
            Request::Ping => Ok(("{\"ok\":true}".into(), false)),
            Request::Stats => Ok((self.stats_line(), false)),
            Request::DeadList { limit } => {
                // Dead letters decided just before are written by the next commit: the queue
                // waits for it.
                let dead = self.queue.dead_letters(limit).await.map_err(|e| {
                    ProtocolError::new(
                        ErrorCode::Unavailable,
                        format!("cannot read dead letters: {e}"),
                    )
                })?;
                let line = serde_json::json!({"ok": true, "dead": dead}).to_string();
                Ok((line, false))
            }
            Request::DeadRetry(selector) => {
                let outcome = self
                    .queue
                    .dead_retry(&selector)
                    .await
                    .map_err(|e| ProtocolError::new(ErrorCode::BadRequest, e))?;
                let line = serde_json::json!({"ok": true, "retried": outcome.affected, "superseded": outcome.superseded}).to_string();
                Ok((line, false))
            }
            Request::DeadPurge(selector) => {
                let outcome = self
                    .queue
                    .dead_purge(&selector)
                    .await
                    .map_err(|e| ProtocolError::new(ErrorCode::BadRequest, e))?;
                let line = serde_json::json!({"ok": true, "purged": outcome.affected}).to_string();
                Ok((line, false))
            }
        }
    }

    fn stats_line(&self) -> String {
        let stats = self.queue.stats();
        let m = &self.metrics;
        let oldest = self.queue.oldest_age();
        let dead_lettered: u64 = ["rejected", "expired", "outcome_unknown"]
            .iter()
            .map(|reason| m.edits_dead_lettered.with_label_values(&[reason]).get())
            .sum();
        let mut line = serde_json::json!({
            "ok": true,
            "pending": stats.pending,
            "in_flight": stats.in_flight,
            "dead": stats.dead,
            "accounts": stats.accounts,
            "refs": stats.refs,
            "oldest_pending_seconds": oldest.map(|d| d.as_secs_f64()),
            "accepted": m.edits_accepted.get(),
            "coalesced": m.edits_coalesced.get(),
            "superseded": m.edits_superseded.get(),
            "delivered": m.edits_delivered.get(),
            "retries": m.retries.get(),
            "rate_limited": m.zoom_rate_limited.with_label_values(&["qps"]).get()
                + m.zoom_rate_limited.with_label_values(&["daily"]).get(),
            "dead_lettered": dead_lettered,
            "accounts_paused": m.accounts_paused.get(),
            "limiter_rate": m.limiter_rate.get(),
            "delivered_rate": m.delivered_rate.get(),
            "connections": m.ingest_connections.get(),
            "storage_error": stats.storage_error,
            "recovering": stats.recovering,
            "token_error": self.health.token_error(),
            // The rows of the per-account series ("accounts" above is a count, kept as it was).
            "per_account": m.account_rows(),
        });
        if let Some(cluster) = self.queue.cluster_view() {
            line["cluster"] = cluster;
        }
        line.to_string()
    }
}
