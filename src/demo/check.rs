//! The demo's end-state check, made at the sandbox (what Zoom shows) once the queue has
//! drained, against what the daemon acknowledged:
//!
//! - every message the producer edited by id shows its last acknowledged edit;
//! - each of the bot's refs is exactly one message at Zoom (found by its `to_jid`), the one
//!   `status` names; a live one shows its last acknowledged content, a deleted one is deleted
//!   (or, if its delete cancelled a send never attempted, Zoom never had it), and no message
//!   was sent that no ref asked for;
//! - the bot was told `gone` for a deleted message and `not_found` for a ref it never sent;
//! - Zoom never had two requests for one message at once.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{json, Value};

use super::lifecycle::{BotRun, Deletion};
use super::socket::ask;
use super::ROBOT_JID;
use crate::sandbox::{MessageRecord, Sandbox};

/// How long the check lets `status` wait for a ref's message id (the queue has drained, so
/// it answers at once unless something is wrong).
const STATUS_WAIT: &str = "10s";

/// What the check found.
#[derive(Debug, Default)]
pub(super) struct Check {
    /// What does not hold, one line each.
    pub problems: Vec<String>,
    /// What holds, for the verdict.
    pub held: Vec<String>,
    /// Most requests Zoom had in flight for one message at once.
    pub max_concurrent: u32,
    /// One line per bot message: its ref, its state and id as `status` gives them, and what
    /// Zoom shows.
    pub bot_messages: Vec<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    /// "check passed: ..." or "check FAILED: ..." with a line per problem.
    pub fn verdict(&self) -> String {
        if self.passed() {
            format!("check passed: {}", self.held.join("; "))
        } else {
            let lines: Vec<String> = self.problems.iter().map(|p| format!("  {p}")).collect();
            format!(
                "{}\ncheck FAILED: {} problem{}",
                lines.join("\n"),
                self.problems.len(),
                if self.problems.len() == 1 { "" } else { "s" }
            )
        }
    }

    /// The producer's messages, named by id: each shows its last acknowledged edit.
    pub fn edits(&mut self, sandbox: &Sandbox, last_acked: &HashMap<String, Value>) {
        if last_acked.is_empty() {
            self.problems
                .push("the producer had no edit acknowledged".to_string());
            return;
        }
        let mut wrong = 0;
        for (message_id, content) in last_acked {
            let shown = sandbox.message(message_id).and_then(|m| m.content);
            if shown.as_ref() != Some(content) {
                wrong += 1;
                self.problems.push(format!(
                    "MISMATCH {message_id}: Zoom shows {shown:?}, last acknowledged {content}"
                ));
            }
        }
        if wrong == 0 {
            self.held.push(format!(
                "all {} messages show their last acknowledged edit",
                last_acked.len()
            ));
        }
    }

    /// The bot's messages, named by ref. Needs the daemon, for `status`.
    pub async fn bot(
        &mut self,
        sandbox: &Sandbox,
        socket: &Path,
        account: &str,
        run: &BotRun,
    ) -> anyhow::Result<()> {
        if run.messages.is_empty() {
            return Ok(());
        }
        let at_zoom = sandbox.messages();
        let before = self.problems.len();
        let (mut live, mut deleted, mut cancelled) = (0, 0, 0);
        for message in &run.messages {
            let reference = &message.reference;
            let status = ask(
                socket,
                &json!({"op": "status", "ref": reference, "account_id": account,
                        "robot_jid": ROBOT_JID, "wait": STATUS_WAIT}),
            )
            .await?;
            if status["ok"] != true {
                self.problems
                    .push(format!("{reference}: status answered {status}"));
                continue;
            }
            let mine: Vec<&MessageRecord> = at_zoom
                .iter()
                .filter(|m| m.to_jid.as_deref() == Some(message.to_jid.as_str()))
                .collect();
            let expected_state = if message.deleted.is_some() {
                "deleted"
            } else {
                "sent"
            };
            if status["state"] != expected_state {
                self.problems.push(format!(
                    "{reference}: status says {}, expected {expected_state}",
                    status["state"]
                ));
            }
            let shown = match mine.as_slice() {
                [] => "nothing at Zoom".to_string(),
                [record] if record.deleted => "deleted at Zoom".to_string(),
                [record] => format!(
                    "Zoom shows {}",
                    record
                        .content
                        .as_ref()
                        .map_or(Value::Null, |c| c["body"][0]["text"].clone())
                ),
                more => format!("{} messages at Zoom", more.len()),
            };
            self.bot_messages.push(format!(
                "{reference:<12} {:<8} {:<38} {shown}",
                status["state"].as_str().unwrap_or("?"),
                status["message_id"].as_str().unwrap_or("-"),
            ));
            if message.deleted == Some(Deletion::Cancelled) {
                cancelled += 1;
                if !mine.is_empty() {
                    self.problems.push(format!(
                        "{reference}: its delete cancelled the send, yet Zoom has {} message(s) for it",
                        mine.len()
                    ));
                }
                continue;
            }
            let [record] = mine.as_slice() else {
                self.problems.push(format!(
                    "{reference}: Zoom has {} messages for it, expected exactly one",
                    mine.len()
                ));
                continue;
            };
            if status["message_id"] != record.message_id.as_str() {
                self.problems.push(format!(
                    "{reference}: status names message {}, Zoom's is {}",
                    status["message_id"], record.message_id
                ));
            }
            match message.deleted {
                Some(_) => {
                    deleted += 1;
                    if !record.deleted {
                        self.problems.push(format!(
                            "{reference}: deleted, yet Zoom still shows message {}",
                            record.message_id
                        ));
                    }
                }
                None => {
                    live += 1;
                    if record.deleted {
                        self.problems
                            .push(format!("{reference}: never deleted, yet Zoom deleted it"));
                    } else if record.content != message.last_acked {
                        self.problems.push(format!(
                            "MISMATCH {reference}: Zoom shows {:?}, last acknowledged {:?}",
                            record.content, message.last_acked
                        ));
                    }
                }
            }
        }
        let to_jids: HashSet<&str> = run.messages.iter().map(|m| m.to_jid.as_str()).collect();
        for stray in at_zoom
            .iter()
            .filter(|m| m.to_jid.as_deref().is_some_and(|to| !to_jids.contains(to)))
        {
            self.problems.push(format!(
                "message {} to {:?} was sent for no ref of the bot",
                stray.message_id, stray.to_jid
            ));
        }
        if let Some(code) = &run.edit_after_delete {
            if code != "gone" {
                self.problems.push(format!(
                    "an edit of a deleted message was answered {code}, not gone"
                ));
            }
        }
        if run.status_of_unknown != "not_found" {
            self.problems.push(format!(
                "a status of a ref never sent was answered {}, not not_found",
                run.status_of_unknown
            ));
        }
        if self.problems.len() == before {
            let mut held = format!(
                "the bot's {} refs: {} are one message each at Zoom, the one status names \
                 ({live} show their last acknowledged content, {deleted} deleted)",
                run.messages.len(),
                live + deleted
            );
            if cancelled > 0 {
                // Deleted before a send was attempted (a send held back by retries, or a
                // slow plan): the delete cancelled it.
                held.push_str(&format!(
                    ", {cancelled} deleted before it was sent, so never at Zoom"
                ));
            }
            self.held.push(held);
        }
        Ok(())
    }

    /// No message had two requests at Zoom at once.
    pub fn concurrency(&mut self, sandbox: &Sandbox) {
        self.max_concurrent = sandbox
            .messages()
            .iter()
            .map(|m| m.max_concurrent)
            .max()
            .unwrap_or(0);
        if self.max_concurrent > 1 {
            self.problems.push(format!(
                "Zoom had {} requests in flight for one message at once",
                self.max_concurrent
            ));
        }
    }
}
