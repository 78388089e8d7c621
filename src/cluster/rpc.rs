//! Requests between daemons: a request for an account whose partition another daemon owns is
//! carried to that daemon over NATS (request and reply on `<prefix>.rpc.p<n>`), which runs it
//! on its own queue and answers. The same typed calls as the queue's, in JSON.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::protocol::{DeadLetter, Delete, Edit, MessageStatus, Selector, Send, StatusQuery};
use crate::queue::{DeadOutcome, Deleted, EnqueueError, Enqueued, LocalQueue};

/// A call on a partition's queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    Enqueue(Edit),
    Send(Send),
    Delete(Delete),
    Status(StatusQuery),
    DeadList(Option<usize>),
    DeadRetry(Selector),
    DeadPurge(Selector),
}

/// Its answer. Job ids are the partition's own (the caller makes them cluster-wide).
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Enqueued(Result<Enqueued, EnqueueError>),
    Deleted(Result<Deleted, EnqueueError>),
    Status(Result<MessageStatus, EnqueueError>),
    Dead(Result<Vec<DeadLetter>, String>),
    DeadOutcome(Result<DeadOutcome, String>),
    /// The daemon asked no longer owns the partition.
    Moved,
}

/// Room left in a NATS message for its subject, reply subject and headers.
pub const HEADROOM: usize = 4096;

/// The format of calls and answers, in a header of every call. A daemon answers a call in
/// another format with a refusal that says so instead of misreading it: during a rolling
/// upgrade that changes the format, forwarded calls are answered `unavailable` with that
/// reason until every daemon runs the same version (calls to the daemon that owns the
/// account are not affected).
const FORMAT: &str = "1";
const FORMAT_HEADER: &str = "Zoomq-Rpc";
/// The header of a refusal (no payload): why.
const REFUSED_HEADER: &str = "Zoomq-Rpc-Refused";

/// The subject a partition's owner answers on.
pub fn subject(prefix: &str, partition: u32) -> String {
    format!("{prefix}.rpc.p{partition}")
}

/// Runs a call on a queue this daemon owns; `Moved` if it is closing (the partition is being
/// given up: the caller tries its next owner).
pub async fn run(queue: &LocalQueue, call: Call) -> Answer {
    if queue.closing() {
        return Answer::Moved;
    }
    let answer = run_open(queue, call).await;
    let refused = matches!(
        &answer,
        Answer::Enqueued(Err(EnqueueError::Unavailable(_)))
            | Answer::Deleted(Err(EnqueueError::Unavailable(_)))
            | Answer::Status(Err(EnqueueError::Unavailable(_)))
    );
    if refused && queue.closing() {
        return Answer::Moved;
    }
    answer
}

async fn run_open(queue: &LocalQueue, call: Call) -> Answer {
    match call {
        Call::Enqueue(edit) => Answer::Enqueued(queue.enqueue(&edit).await),
        Call::Send(send) => Answer::Enqueued(queue.send(&send).await),
        Call::Delete(delete) => Answer::Deleted(queue.delete(&delete).await),
        Call::Status(query) => Answer::Status(queue.status(&query).await),
        Call::DeadList(limit) => Answer::Dead(match queue.settled().await {
            Ok(()) => queue.dead_letters(limit).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        }),
        Call::DeadRetry(selector) => Answer::DeadOutcome(queue.dead_retry(&selector).await),
        Call::DeadPurge(selector) => Answer::DeadOutcome(queue.dead_purge(&selector).await),
    }
}

/// Serves calls for one partition until `stop`. Calls run concurrently (a `status` with
/// `wait` must not hold up the others), but each starts in the order it arrived: a queue call
/// takes its place in the index when first polled, so edits a producer pipelined on one
/// connection (published in order on one NATS connection) are applied in that order.
pub async fn serve(
    client: async_nats::Client,
    subject: String,
    queue: LocalQueue,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut subscription = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::error!(%subject, error = %e, "cannot serve requests of other daemons; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    let queue = Arc::new(queue);
    // Polled in push order at first: see above.
    let mut running = futures_util::stream::FuturesUnordered::new();
    loop {
        let message = tokio::select! {
            m = subscription.next() => m,
            Some(()) = running.next(), if !running.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        let Some(message) = message else { break };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let format = message
            .headers
            .as_ref()
            .and_then(|h| h.get(FORMAT_HEADER))
            .map(|v| v.as_str().to_string());
        if format.as_deref() != Some(FORMAT) {
            let mut headers = async_nats::HeaderMap::new();
            let why = format!(
                "the daemon that owns this partition reads forwarding format {FORMAT}, the call \
                 was in format {}: run one zoomq version on every daemon",
                format.as_deref().unwrap_or("0")
            );
            headers.insert(REFUSED_HEADER, why.as_str());
            if let Err(e) = client
                .publish_with_headers(reply, headers, bytes::Bytes::new())
                .await
            {
                tracing::warn!(error = %e, "cannot answer another daemon's request");
            }
            continue;
        }
        let (client, queue, stop) = (client.clone(), queue.clone(), stop.clone());
        running.push(async move {
            let answer = match serde_json::from_slice::<Call>(&message.payload) {
                Ok(_) if stop.is_cancelled() => Answer::Moved,
                Ok(call) => run(&queue, call).await,
                Err(e) => Answer::Dead(Err(format!("unreadable request: {e}"))),
            };
            let mut payload = serde_json::to_vec(&answer).expect("answers serialize");
            if payload.len() + HEADROOM > client.server_info().max_payload {
                let error = Answer::Dead(Err(format!(
                    "the answer ({} bytes) is larger than NATS carries; ask for fewer (limit)",
                    payload.len()
                )));
                payload = serde_json::to_vec(&error).expect("answers serialize");
            }
            if let Err(e) = client.publish(reply, payload.into()).await {
                tracing::warn!(error = %e, "cannot answer another daemon's request");
            }
        });
    }
    let _ = subscription.unsubscribe().await;
    // Requests that arrived meanwhile are sent on to the next owner.
    while let Ok(Some(message)) =
        tokio::time::timeout(std::time::Duration::from_millis(100), subscription.next()).await
    {
        if let Some(reply) = message.reply {
            let payload = serde_json::to_vec(&Answer::Moved).expect("answers serialize");
            let _ = client.publish(reply, payload.into()).await;
        }
    }
    // Calls already started are answered.
    while running.next().await.is_some() {}
}

/// Why a call could not be carried.
#[derive(Debug)]
pub enum CallError {
    /// No daemon owns the partition right now (between a failover's start and end).
    NoOwner,
    /// Larger than a NATS message may be: (its size, the servers' `max_payload`).
    TooLarge(usize, usize),
    Failed(String),
}

/// Carries `call` to the partition's owner and returns its answer.
pub async fn call(
    client: &async_nats::Client,
    subject: String,
    call: &Call,
    timeout: Duration,
) -> Result<Answer, CallError> {
    let payload = serde_json::to_vec(call).expect("calls serialize");
    let max_payload = client.server_info().max_payload;
    if payload.len() + HEADROOM > max_payload {
        return Err(CallError::TooLarge(payload.len(), max_payload));
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(FORMAT_HEADER, FORMAT);
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(payload.into())
        .timeout(Some(timeout));
    match client.send_request(subject, request).await {
        Ok(message) => {
            if let Some(why) = message.headers.as_ref().and_then(|h| h.get(REFUSED_HEADER)) {
                return Err(CallError::Failed(why.as_str().to_string()));
            }
            serde_json::from_slice(&message.payload)
                .map_err(|e| CallError::Failed(format!("unreadable answer: {e}")))
        }
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(CallError::NoOwner),
        Err(e) => Err(CallError::Failed(e.to_string())),
    }
}
