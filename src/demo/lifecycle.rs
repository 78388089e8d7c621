//! The demo bot, which leaves its messages' whole life to zoomq and never learns a Zoom id
//! while it runs. It sends a few messages by a `ref` of its own, each to a conversation of its
//! own; edits them by ref faster than the account's limit, so edits coalesce (and the first
//! ones join the pending send); sends them all again halfway, as a bot that keeps no state
//! would (an upsert: still one message each); deletes some near the end; and then asks what a
//! bot gets for a deleted message (`gone`) and for a ref it never sent (`not_found`). What the
//! daemon acknowledged is what the check holds Zoom to.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::socket::{ask, Pipeline};
use super::ROBOT_JID;

/// What the bot does.
#[derive(Debug, Clone)]
pub(super) struct BotPlan {
    pub account: String,
    /// Messages it sends; every third one is deleted near the end.
    pub messages: usize,
    /// Edits per second, over all its messages.
    pub rate: u32,
    pub duration: Duration,
}

/// One of the bot's messages and what the daemon acknowledged for it.
#[derive(Debug, Clone)]
pub(super) struct BotMessage {
    pub reference: String,
    /// Each message goes to a conversation of its own, so the sandbox's messages can be told
    /// apart by their `to_jid`.
    pub to_jid: String,
    /// The content of its last acknowledged send or edit.
    pub last_acked: Option<Value>,
    /// Set once its delete was acknowledged.
    pub deleted: Option<Deletion>,
}

/// How an acknowledged delete ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deletion {
    /// A delete job: Zoom deletes the message after it was sent.
    Queued,
    /// The send was never attempted, so the delete cancelled it: Zoom never sees the message.
    Cancelled,
}

/// What the bot did and was told.
#[derive(Debug, Clone)]
pub(super) struct BotRun {
    pub messages: Vec<BotMessage>,
    /// The error code of an edit of a deleted message, sent after the run (`None` if nothing
    /// was deleted).
    pub edit_after_delete: Option<String>,
    /// The error code of a `status` of a ref never sent.
    pub status_of_unknown: String,
}

/// What a pipelined request was.
enum Sent {
    Content(Value),
    Delete,
}

fn reference(index: usize) -> String {
    format!("demo-bot-{index}")
}

fn to_jid(index: usize) -> String {
    format!("demo-channel-{index}@conference.xmpp.zoom.us")
}

/// Whether the bot deletes message `index` near the end: every third one.
fn deleted_near_the_end(index: usize) -> bool {
    index % 3 == 2
}

fn content(reference: &str, text: &str) -> Value {
    json!({
        "head": {"text": format!("Deploy {reference}")},
        "body": [{"type": "message", "text": text}]
    })
}

/// Runs the bot, telling `events` what it does as it does it.
pub(super) async fn run_bot(
    socket: PathBuf,
    plan: BotPlan,
    events: mpsc::UnboundedSender<String>,
) -> anyhow::Result<BotRun> {
    if plan.messages == 0 {
        // No bot (`--bot-messages 0`): nothing to do, and nothing for the check to look at.
        return Ok(BotRun {
            messages: Vec::new(),
            edit_after_delete: None,
            status_of_unknown: String::new(),
        });
    }
    let messages: Vec<BotMessage> = (0..plan.messages)
        .map(|index| BotMessage {
            reference: reference(index),
            to_jid: to_jid(index),
            last_acked: None,
            deleted: None,
        })
        .collect();
    let mut pipeline = Pipeline::open(
        &socket,
        messages,
        |messages: &mut Vec<BotMessage>, tag, answer| on_answer(messages, tag, answer),
    )
    .await?;
    let account = plan.account.as_str();
    let send = |index: usize, content: &Value| {
        json!({"op": "send", "ref": reference(index), "account_id": account,
               "robot_jid": ROBOT_JID, "to_jid": to_jid(index), "content": content})
    };

    let started = Instant::now();
    for index in 0..plan.messages {
        let content = content(&reference(index), "queued");
        pipeline
            .send(&send(index, &content), (index, Sent::Content(content)))
            .await?;
    }
    let _ = events.send(format!(
        "bot: sent {} messages by ref ({} to {}); editing them by ref {} times a second",
        plan.messages,
        reference(0),
        reference(plan.messages - 1),
        plan.rate
    ));

    let mut live: Vec<usize> = (0..plan.messages).collect();
    let mut steps = vec![0u64; plan.messages];
    let (mut sent_again, mut deleted) = (false, false);
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1))));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0usize;
    while started.elapsed() < plan.duration {
        ticker.tick().await;
        if !sent_again && started.elapsed() >= plan.duration / 2 {
            sent_again = true;
            for &index in &live {
                let text = format!("step {}, sent again", steps[index]);
                let content = content(&reference(index), &text);
                pipeline
                    .send(&send(index, &content), (index, Sent::Content(content)))
                    .await?;
            }
            let _ = events.send(format!(
                "bot: sent all {} again, as a bot that keeps no state would: each ref stays one message",
                live.len()
            ));
        }
        if !deleted && started.elapsed() >= plan.duration.mul_f64(0.8) {
            deleted = true;
            let (gone, kept): (Vec<usize>, Vec<usize>) =
                live.iter().partition(|&&index| deleted_near_the_end(index));
            for &index in &gone {
                let request = json!({"op": "delete", "ref": reference(index),
                                     "account_id": account, "robot_jid": ROBOT_JID});
                pipeline.send(&request, (index, Sent::Delete)).await?;
            }
            live = kept;
            if !gone.is_empty() {
                let names: Vec<String> = gone.iter().map(|&index| reference(index)).collect();
                let _ = events.send(format!("bot: deleted {}", names.join(", ")));
            }
        }
        let index = live[n % live.len()];
        n += 1;
        steps[index] += 1;
        let reference = reference(index);
        let content = content(&reference, &format!("step {}", steps[index]));
        let request = json!({"op": "edit", "ref": reference, "account_id": account,
                             "robot_jid": ROBOT_JID, "content": content});
        pipeline
            .send(&request, (index, Sent::Content(content)))
            .await?;
    }
    let messages = pipeline.finish().await?;

    // Asked only now that every answer is in, so the delete was acknowledged before the edit
    // is sent.
    let mut told = Vec::new();
    let mut edit_after_delete = None;
    if let Some(message) = messages.iter().find(|m| m.deleted.is_some()) {
        let reference = &message.reference;
        let request = json!({"op": "edit", "ref": reference, "account_id": account,
                             "robot_jid": ROBOT_JID, "content": content(reference, "too late")});
        let code = error_code(&socket, &request).await?;
        told.push(format!("{code} for an edit of deleted {reference}"));
        edit_after_delete = Some(code);
    }
    let never_sent = "demo-bot-never-sent";
    let request = json!({"op": "status", "ref": never_sent, "account_id": account,
                         "robot_jid": ROBOT_JID});
    let status_of_unknown = error_code(&socket, &request).await?;
    told.push(format!("{status_of_unknown} for a status of {never_sent}"));
    let _ = events.send(format!("bot: told {}", told.join(", ")));
    Ok(BotRun {
        messages,
        edit_after_delete,
        status_of_unknown,
    })
}

/// Folds one answer into the bot's messages; any refusal ends the bot, since all its
/// requests are valid.
fn on_answer(
    messages: &mut [BotMessage],
    (index, sent): (usize, Sent),
    answer: Value,
) -> anyhow::Result<()> {
    let message = &mut messages[index];
    if answer["ok"] != true {
        let op = match sent {
            Sent::Content(_) => "send or edit",
            Sent::Delete => "delete",
        };
        anyhow::bail!("{op} of {} refused: {answer}", message.reference);
    }
    match sent {
        Sent::Content(content) => message.last_acked = Some(content),
        Sent::Delete if answer["cancelled"] == true => message.deleted = Some(Deletion::Cancelled),
        Sent::Delete => message.deleted = Some(Deletion::Queued),
    }
    Ok(())
}

/// The error code of a request the bot expects to be refused ("ok" if it was not).
async fn error_code(socket: &Path, request: &Value) -> anyhow::Result<String> {
    let answer = ask(socket, request).await?;
    Ok(if answer["ok"] == true {
        "ok".to_string()
    } else {
        answer["error"].as_str().unwrap_or("(no code)").to_string()
    })
}
