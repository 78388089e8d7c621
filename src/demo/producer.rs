//! The demo's load: a producer that edits a few messages by `message_id`, many times faster
//! than the account's limit, as a bot showing live progress does. Zoom's limit lets only a
//! fraction of the edits through; the rest coalesce, and the check holds each message to its
//! last acknowledged edit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::socket::Pipeline;
use super::ROBOT_JID;

/// Pipelines edits of `messages` messages over one connection at `rate` per second for
/// `duration`, and returns the last acknowledged content of each message.
pub(super) async fn produce(
    socket: PathBuf,
    account: String,
    messages: usize,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<HashMap<String, Value>> {
    let mut pipeline = Pipeline::open(
        &socket,
        HashMap::new(),
        |acked: &mut HashMap<String, Value>, (message_id, content): (String, Value), answer| {
            if answer["ok"] != true {
                anyhow::bail!("edit of {message_id} refused: {answer}");
            }
            acked.insert(message_id, content);
            Ok(())
        },
    )
    .await?;
    let messages = messages.max(1);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        let message = n as usize % messages;
        let message_id = format!("demo-msg-{message}");
        let step = n / messages as u64;
        let content = json!({
            "head": {"text": format!("Build {message}")},
            "body": [{"type": "message", "text": format!("step {step} done")}]
        });
        let request = json!({
            "op": "edit",
            "message_id": message_id,
            "account_id": account,
            "robot_jid": ROBOT_JID,
            "content": content,
        });
        pipeline.send(&request, (message_id, content)).await?;
        n += 1;
    }
    pipeline.finish().await
}
