//! The producer protocol: one JSON request object per line, one JSON response line per request.
//! This module owns parsing and validation of requests and the wire form of responses; it does
//! no I/O (`ingest` moves bytes, `queue` stores edits).
//!
//! Every field is first read as raw JSON and then checked by hand, so an error names the field
//! and says what was expected (serde's own messages only give a column): that is `parse.rs`.
//! This file holds the vocabulary: requests, error codes, answers.

mod parse;
pub use parse::{parse_job_id, parse_request};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest `message_id` accepted, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 256;
/// Longest `account_id`, `robot_jid` or `user_jid` accepted, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Longest `ref` accepted, in bytes: the same bound as a `message_id`, which it stands for.
pub const MAX_REF_BYTES: usize = 256;

/// A parsed, validated request.
#[derive(Debug)]
pub enum Request {
    Send(Send),
    Edit(Edit),
    Delete(Delete),
    Status(StatusQuery),
    Ping,
    Stats,
    DeadList { limit: Option<usize> },
    DeadRetry(Selector),
    DeadPurge(Selector),
}

/// Which dead letters an operator command applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    One(u64),
    All,
}

/// How a request names its message: by Zoom's `message_id` or by the producer's own `ref`
/// (unique per `account_id` + `robot_jid`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    MessageId(String),
    Ref(String),
}

/// A new message, named by the producer's `ref` (see ARCHITECTURE.md, "The life of a message").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Send {
    pub reference: String,
    pub account_id: String,
    pub robot_jid: String,
    pub to_jid: String,
    pub user_jid: Option<String>,
    pub visible_to_user: Option<String>,
    pub reply_to: Option<String>,
    pub is_markdown_support: Option<bool>,
    /// A non-empty JSON object, kept as the producer's text.
    pub content: Box<RawValue>,
}

impl Send {
    /// The JSON body of Zoom's "Send a chatbot message" call.
    pub fn zoom_body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            robot_jid: &'a str,
            to_jid: &'a str,
            account_id: &'a str,
            content: &'a RawValue,
            #[serde(skip_serializing_if = "Option::is_none")]
            user_jid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            visible_to_user: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reply_to: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            is_markdown_support: Option<bool>,
        }
        serde_json::to_vec(&Body {
            robot_jid: &self.robot_jid,
            to_jid: &self.to_jid,
            account_id: &self.account_id,
            content: &self.content,
            user_jid: self.user_jid.as_deref(),
            visible_to_user: self.visible_to_user.as_deref(),
            reply_to: self.reply_to.as_deref(),
            is_markdown_support: self.is_markdown_support,
        })
        .expect("serializing strings and raw JSON cannot fail")
    }
}

/// One edit of a chat-bot message, as a producer sent it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Edit {
    pub target: Target,
    pub account_id: String,
    pub robot_jid: String,
    pub user_jid: Option<String>,
    pub is_markdown_support: Option<bool>,
    /// A non-empty JSON object, kept as the producer's text.
    pub content: Box<RawValue>,
}

impl Edit {
    /// The JSON body of Zoom's "Edit a chatbot message" call for this edit.
    pub fn zoom_body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            robot_jid: &'a str,
            account_id: &'a str,
            content: &'a RawValue,
            #[serde(skip_serializing_if = "Option::is_none")]
            user_jid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            is_markdown_support: Option<bool>,
        }
        serde_json::to_vec(&Body {
            robot_jid: &self.robot_jid,
            account_id: &self.account_id,
            content: &self.content,
            user_jid: self.user_jid.as_deref(),
            is_markdown_support: self.is_markdown_support,
        })
        .expect("serializing strings and raw JSON cannot fail")
    }
}

/// The deletion of a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delete {
    pub target: Target,
    pub account_id: String,
    pub robot_jid: String,
    pub user_jid: Option<String>,
}

/// A question about where a message stands; with `wait`, answered once it has a `message_id`
/// or reached a final state (bounded by the configuration).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusQuery {
    pub target: Target,
    pub account_id: String,
    pub robot_jid: String,
    pub wait: Option<std::time::Duration>,
}

/// Error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    QueueFull,
    Unavailable,
    Internal,
    /// Sent once, before closing, to a peer refused by `socket.allowed_uids`/`allowed_gids`.
    Forbidden,
    /// The `ref` or `message_id` is unknown (never sent through zoomq, or its ref forgotten
    /// after `storage.ref_retention`).
    NotFound,
    /// The message was deleted: sends, edits and deletes naming it are refused for good.
    Gone,
}

/// Every error code, for metrics that list them all from the start.
pub const ALL_ERROR_CODES: [ErrorCode; 8] = [
    ErrorCode::BadRequest,
    ErrorCode::TooLarge,
    ErrorCode::QueueFull,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
    ErrorCode::Forbidden,
    ErrorCode::NotFound,
    ErrorCode::Gone,
];

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Gone => "gone",
        }
    }
}

/// An error answer: `{"ok":false,"error":CODE,"message":TEXT}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> ProtocolError {
        ProtocolError::new(ErrorCode::BadRequest, message)
    }

    /// The response line, without the trailing newline.
    pub fn to_line(&self) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            ok: bool,
            error: ErrorCode,
            message: &'a str,
        }
        serde_json::to_string(&Wire {
            ok: false,
            error: self.code,
            message: &self.message,
        })
        .expect("serializing a string cannot fail")
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// The success answer to an edit, by `message_id` or by `ref`.
pub fn edit_ok_line(job_id: u64, coalesced: bool) -> String {
    format!("{{\"ok\":true,\"job_id\":\"{job_id}\",\"coalesced\":{coalesced}}}")
}

/// The success answer to a send: `{"ok":true,"job_id":"N","ref":"R","coalesced":B}`. The ref
/// is the producer's own text (quotes, backslashes, any Unicode), so serde writes it.
pub fn send_ok_line(job_id: u64, reference: &str, coalesced: bool) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        ok: bool,
        job_id: String,
        #[serde(rename = "ref")]
        reference: &'a str,
        coalesced: bool,
    }
    serde_json::to_string(&Wire {
        ok: true,
        job_id: job_id.to_string(),
        reference,
        coalesced,
    })
    .expect("serializing strings cannot fail")
}

/// The success answer to a delete: `{"ok":true,"job_id":"N"}`, or `{"ok":true,"cancelled":true}`
/// when it cancelled a send never attempted. A cancelled send leaves no job to follow, so
/// `job_id` is left out then whatever is passed; with neither, `{"ok":true}`.
pub fn delete_ok_line(job_id: Option<u64>, cancelled: bool) -> String {
    #[derive(Serialize)]
    struct Wire {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
    }
    serde_json::to_string(&Wire {
        ok: true,
        job_id: job_id.filter(|_| !cancelled).map(|id| id.to_string()),
        cancelled,
    })
    .expect("serializing strings cannot fail")
}

/// Where a message stands, as `status` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Waiting to be sent (or its latest edit or delete waiting).
    Pending,
    /// A request to Zoom is under way.
    InFlight,
    /// Zoom has the message and its latest content.
    Sent,
    Deleted,
    /// Zoom refused it or it could not be delivered; `reason` says why.
    Dead,
}

/// The answer to `status`, without `ok`; fields not known are left out of the wire form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatus {
    pub state: MessageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The success answer to `status`: `{"ok":true,"state":"sent","message_id":"...",...}`.
pub fn status_line(status: &MessageStatus) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        ok: bool,
        #[serde(flatten)]
        status: &'a MessageStatus,
    }
    serde_json::to_string(&Wire { ok: true, status }).expect("serializing strings cannot fail")
}

/// A dead letter as `dead_list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job_id: String,
    /// Zoom's id of the message; empty for a message named by a ref that has none yet.
    pub message_id: String,
    /// The producer's name of the message, when it gave one.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none", default)]
    pub reference: Option<String>,
    /// The call that failed: `send`, `edit` or `delete`.
    #[serde(default)]
    pub op: String,
    pub account_id: String,
    /// `rejected` (Zoom refused it), `expired` (failing longer than delivery.max_age) or
    /// `outcome_unknown` (a send that may have been posted; `delivery.send_in_doubt`).
    pub reason: String,
    pub status: Option<u16>,
    pub zoom_code: Option<i64>,
    pub detail: String,
    pub attempts: u32,
    /// Unix milliseconds.
    pub enqueued_ms: u64,
    pub dead_ms: u64,
}

#[cfg(test)]
mod tests;
