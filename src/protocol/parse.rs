//! Parsing and validating one request line: every field read as raw JSON, then checked by
//! hand, so that an error names the field and says what was expected.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::*;

/// Every field any request may carry, each still raw JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow, rename = "ref")]
    reference: Option<&'a RawValue>,
    #[serde(borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    account_id: Option<&'a RawValue>,
    #[serde(borrow)]
    robot_jid: Option<&'a RawValue>,
    #[serde(borrow)]
    to_jid: Option<&'a RawValue>,
    #[serde(borrow)]
    user_jid: Option<&'a RawValue>,
    #[serde(borrow)]
    visible_to_user: Option<&'a RawValue>,
    #[serde(borrow)]
    reply_to: Option<&'a RawValue>,
    #[serde(borrow)]
    is_markdown_support: Option<&'a RawValue>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    #[serde(borrow)]
    wait: Option<&'a RawValue>,
    #[serde(borrow)]
    job_id: Option<&'a RawValue>,
    #[serde(borrow)]
    all: Option<&'a RawValue>,
    #[serde(borrow)]
    limit: Option<&'a RawValue>,
}

/// Parses and validates one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let text = std::str::from_utf8(line).map_err(|e| {
        ProtocolError::bad(format!(
            "request is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(ProtocolError::bad("empty line: expected a JSON object"));
    }
    if !text.trim_start().starts_with('{') {
        // serde would happily read a struct from an array; say what is wrong instead.
        return Err(ProtocolError::bad(
            match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => "expected a JSON object (one request per line)".to_string(),
                Err(e) => format!("invalid JSON: {e}"),
            },
        ));
    }
    let raw: RawRequest<'_> = serde_json::from_str(text).map_err(|e| {
        let what = if e.is_data() {
            // deny_unknown_fields and "expected struct" errors.
            e.to_string()
        } else {
            format!("invalid JSON: {e}")
        };
        ProtocolError::bad(what)
    })?;
    let op: String = required_string(raw.op, "op")?;
    let only = |allowed: &[&str]| -> Result<(), ProtocolError> {
        let present = [
            ("ref", raw.reference.is_some()),
            ("message_id", raw.message_id.is_some()),
            ("account_id", raw.account_id.is_some()),
            ("robot_jid", raw.robot_jid.is_some()),
            ("to_jid", raw.to_jid.is_some()),
            ("user_jid", raw.user_jid.is_some()),
            ("visible_to_user", raw.visible_to_user.is_some()),
            ("reply_to", raw.reply_to.is_some()),
            ("is_markdown_support", raw.is_markdown_support.is_some()),
            ("content", raw.content.is_some()),
            ("wait", raw.wait.is_some()),
            ("job_id", raw.job_id.is_some()),
            ("all", raw.all.is_some()),
            ("limit", raw.limit.is_some()),
        ];
        match present
            .iter()
            .find(|(name, is_present)| *is_present && !allowed.contains(name))
        {
            Some((name, _)) => Err(ProtocolError::bad(format!(
                "field `{name}` is not allowed in op \"{op}\""
            ))),
            None => Ok(()),
        }
    };
    match op.as_str() {
        "send" => {
            only(&[
                "ref",
                "account_id",
                "robot_jid",
                "to_jid",
                "user_jid",
                "visible_to_user",
                "reply_to",
                "is_markdown_support",
                "content",
            ])?;
            Ok(Request::Send(Send {
                reference: identifier(raw.reference, "ref", MAX_REF_BYTES)?,
                account_id: identifier(raw.account_id, "account_id", MAX_ID_BYTES)?,
                robot_jid: identifier(raw.robot_jid, "robot_jid", MAX_ID_BYTES)?,
                to_jid: identifier(raw.to_jid, "to_jid", MAX_ID_BYTES)?,
                user_jid: optional_identifier(raw.user_jid, "user_jid", MAX_ID_BYTES)?,
                visible_to_user: optional_identifier(
                    raw.visible_to_user,
                    "visible_to_user",
                    MAX_ID_BYTES,
                )?,
                // The parent message's id, so a message id's bound.
                reply_to: optional_identifier(raw.reply_to, "reply_to", MAX_MESSAGE_ID_BYTES)?,
                is_markdown_support: optional_bool(raw.is_markdown_support, "is_markdown_support")?,
                content: content(raw.content)?,
            }))
        }
        "edit" => {
            only(&[
                "ref",
                "message_id",
                "account_id",
                "robot_jid",
                "user_jid",
                "is_markdown_support",
                "content",
            ])?;
            Ok(Request::Edit(Edit {
                target: target(raw.message_id, raw.reference)?,
                account_id: identifier(raw.account_id, "account_id", MAX_ID_BYTES)?,
                robot_jid: identifier(raw.robot_jid, "robot_jid", MAX_ID_BYTES)?,
                user_jid: optional_identifier(raw.user_jid, "user_jid", MAX_ID_BYTES)?,
                is_markdown_support: optional_bool(raw.is_markdown_support, "is_markdown_support")?,
                content: content(raw.content)?,
            }))
        }
        "delete" => {
            only(&["ref", "message_id", "account_id", "robot_jid", "user_jid"])?;
            Ok(Request::Delete(Delete {
                target: target(raw.message_id, raw.reference)?,
                account_id: identifier(raw.account_id, "account_id", MAX_ID_BYTES)?,
                robot_jid: identifier(raw.robot_jid, "robot_jid", MAX_ID_BYTES)?,
                user_jid: optional_identifier(raw.user_jid, "user_jid", MAX_ID_BYTES)?,
            }))
        }
        "status" => {
            only(&["ref", "message_id", "account_id", "robot_jid", "wait"])?;
            Ok(Request::Status(StatusQuery {
                target: target(raw.message_id, raw.reference)?,
                account_id: identifier(raw.account_id, "account_id", MAX_ID_BYTES)?,
                robot_jid: identifier(raw.robot_jid, "robot_jid", MAX_ID_BYTES)?,
                wait: wait(raw.wait)?,
            }))
        }
        "ping" => only(&[]).map(|()| Request::Ping),
        "stats" => only(&[]).map(|()| Request::Stats),
        "dead_list" => {
            only(&["limit"])?;
            let limit = match optional(raw.limit) {
                Some(value) => Some(serde_json::from_str::<usize>(value.get()).map_err(|_| {
                    ProtocolError::bad(format!(
                        "field `limit`: expected a non-negative integer, got {}",
                        excerpt(value)
                    ))
                })?),
                None => None,
            };
            Ok(Request::DeadList { limit })
        }
        "dead_retry" | "dead_purge" => {
            only(&["job_id", "all"])?;
            let selector = selector(raw.job_id, raw.all)?;
            Ok(if op == "dead_retry" {
                Request::DeadRetry(selector)
            } else {
                Request::DeadPurge(selector)
            })
        }
        other => Err(ProtocolError::bad(format!(
            "field `op`: unknown operation {other:?}; expected one of \"send\", \"edit\", \
             \"delete\", \"status\", \"ping\", \"stats\", \"dead_list\", \"dead_retry\", \
             \"dead_purge\""
        ))),
    }
}

/// Parses a job id as printed in answers (a decimal number in a string).
pub fn parse_job_id(text: &str) -> Option<u64> {
    text.parse::<u64>().ok()
}

fn optional(value: Option<&RawValue>) -> Option<&RawValue> {
    value.filter(|v| v.get() != "null")
}

fn excerpt(value: &RawValue) -> String {
    let text = value.get();
    if text.len() <= 40 {
        text.to_string()
    } else {
        let mut end = 40;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
}

fn required_string(value: Option<&RawValue>, field: &str) -> Result<String, ProtocolError> {
    let value =
        optional(value).ok_or_else(|| ProtocolError::bad(format!("field `{field}` is missing")))?;
    serde_json::from_str::<String>(value.get()).map_err(|_| {
        ProtocolError::bad(format!(
            "field `{field}`: expected a string, got {}",
            excerpt(value)
        ))
    })
}

fn identifier(
    value: Option<&RawValue>,
    field: &str,
    max_bytes: usize,
) -> Result<String, ProtocolError> {
    let text = required_string(value, field)?;
    if text.is_empty() {
        return Err(ProtocolError::bad(format!(
            "field `{field}`: expected a non-empty string"
        )));
    }
    if text.len() > max_bytes {
        return Err(ProtocolError::bad(format!(
            "field `{field}`: {} bytes long, at most {max_bytes} allowed",
            text.len()
        )));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(ProtocolError::bad(format!(
            "field `{field}`: contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(text)
}

fn optional_identifier(
    value: Option<&RawValue>,
    field: &str,
    max_bytes: usize,
) -> Result<Option<String>, ProtocolError> {
    optional(value)
        .map(|value| identifier(Some(value), field, max_bytes))
        .transpose()
}

fn optional_bool(value: Option<&RawValue>, field: &str) -> Result<Option<bool>, ProtocolError> {
    optional(value)
        .map(|value| {
            serde_json::from_str::<bool>(value.get()).map_err(|_| {
                ProtocolError::bad(format!(
                    "field `{field}`: expected true or false, got {}",
                    excerpt(value)
                ))
            })
        })
        .transpose()
}

/// The message a request names: exactly one of `message_id` and `ref`, since the two could
/// name different messages.
fn target(
    message_id: Option<&RawValue>,
    reference: Option<&RawValue>,
) -> Result<Target, ProtocolError> {
    match (optional(message_id), optional(reference)) {
        (Some(_), Some(_)) => Err(ProtocolError::bad(
            "give either `message_id` or `ref`, not both",
        )),
        (None, None) => Err(ProtocolError::bad("field `message_id` or `ref` is missing")),
        (Some(value), None) => {
            identifier(Some(value), "message_id", MAX_MESSAGE_ID_BYTES).map(Target::MessageId)
        }
        (None, Some(value)) => identifier(Some(value), "ref", MAX_REF_BYTES).map(Target::Ref),
    }
}

/// `wait` in the configuration's duration syntax ("10s", "500ms"). Its upper bound is the
/// daemon's configuration, checked there.
fn wait(value: Option<&RawValue>) -> Result<Option<std::time::Duration>, ProtocolError> {
    let Some(value) = optional(value) else {
        return Ok(None);
    };
    let expected = |detail: String| {
        ProtocolError::bad(format!(
            "field `wait`: expected a duration such as \"10s\" or \"500ms\", got {}{detail}",
            excerpt(value)
        ))
    };
    let text = serde_json::from_str::<String>(value.get()).map_err(|_| expected(String::new()))?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| expected(format!(" ({e})")))
}

fn content(value: Option<&RawValue>) -> Result<Box<RawValue>, ProtocolError> {
    let value = optional(value).ok_or_else(|| ProtocolError::bad("field `content` is missing"))?;
    let text = value.get();
    // RawValue is already valid JSON with no surrounding whitespace, so an object starts
    // with `{` and is empty exactly when only whitespace stands before its `}`.
    let is_object = text.starts_with('{');
    let is_empty = text[1..].trim_start().starts_with('}');
    if !is_object {
        return Err(ProtocolError::bad(format!(
            "field `content`: expected a JSON object (Zoom's message template), got {}",
            excerpt(value)
        )));
    }
    if is_empty {
        return Err(ProtocolError::bad(
            "field `content`: the object is empty; Zoom rejects empty messages",
        ));
    }
    // JSON's grammar allows `\ud800` alone, which is not Unicode and which strict parsers
    // (Zoom's among them, presumably) refuse. Only text with `\u` escapes can hold one, so
    // only that text pays for a full parse.
    if text.contains("\\u") {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
            return Err(ProtocolError::bad(format!(
                "field `content`: invalid string escape ({e})"
            )));
        }
    }
    Ok(value.to_owned())
}

fn selector(job_id: Option<&RawValue>, all: Option<&RawValue>) -> Result<Selector, ProtocolError> {
    let all = optional_bool(all, "all")?.unwrap_or(false);
    match (optional(job_id), all) {
        (Some(_), true) => Err(ProtocolError::bad(
            "give either `job_id` or `all`: true, not both",
        )),
        (None, true) => Ok(Selector::All),
        (None, false) => Err(ProtocolError::bad(
            "field `job_id` is missing (or set `all`: true)",
        )),
        (Some(value), false) => {
            let text = required_string(Some(value), "job_id")?;
            parse_job_id(&text).map(Selector::One).ok_or_else(|| {
                ProtocolError::bad(format!(
                    "field `job_id`: expected a job id such as \"42\", got {text:?}"
                ))
            })
        }
    }
}
