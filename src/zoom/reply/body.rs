//! An answer's body: read at most [`MAX_BODY`] bytes of it, make out what an error body says
//! however it is shaped, and quote any of it as one short line.

use serde_json::Value;

/// Most bytes of an answer body kept; a hostile or broken server cannot make us buffer more.
pub(super) const MAX_BODY: usize = 64 * 1024;
/// Most characters of a body quoted in an error message.
const EXCERPT_CHARS: usize = 200;

/// What an error body says, as far as it can be made out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::zoom) struct ErrorBody {
    pub code: Option<i64>,
    /// Never longer than about [`EXCERPT_CHARS`]; empty when the body said nothing.
    pub message: String,
}

/// Parses Zoom's `{"code": int, "message": str}` leniently: a string code, OAuth's
/// `error`/`reason`, an `errors` array (strings or objects with `message`), `result: false`
/// (ignored) and non-JSON bodies (quoted as a short excerpt) are all accepted.
pub(in crate::zoom) fn parse_error_body(body: &[u8]) -> ErrorBody {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return ErrorBody {
            code: None,
            message: excerpt(body),
        };
    };
    let mut code = map.get("code").and_then(as_code);
    let mut message = ["message", "reason", "error_description", "error"]
        .iter()
        .find_map(|key| {
            map.get(*key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_default()
        .to_string();
    let details: Vec<String> = match map.get("errors") {
        Some(Value::Array(errors)) => errors
            .iter()
            .filter_map(|item| match item {
                Value::String(text) => Some(text.clone()),
                Value::Object(fields) => {
                    code = code.or_else(|| fields.get("code").and_then(as_code));
                    fields
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if !details.is_empty() {
        let joined = details.join("; ");
        message = if message.is_empty() {
            joined
        } else {
            format!("{message} ({joined})")
        };
    }
    ErrorBody {
        code,
        message: excerpt(message.as_bytes()),
    }
}

fn as_code(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// A body as one short line of text: lossy UTF-8, control characters as spaces, at most
/// [`EXCERPT_CHARS`] characters (cut on a character boundary, marked with `…`).
pub(in crate::zoom) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Reads at most [`MAX_BODY`] bytes of a body. A failure while reading keeps what arrived:
/// the status line already decided the outcome, the body only explains it.
pub(in crate::zoom) async fn read_capped(response: &mut reqwest::Response) -> Vec<u8> {
    let mut buffer = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_BODY - buffer.len();
                buffer.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if buffer.len() >= MAX_BODY {
                    break;
                }
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(error = %error, "could not read the whole answer body");
                break;
            }
        }
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_read_leniently() {
        let zoom = parse_error_body(br#"{"code":8001,"message":"Invalid message_id value."}"#);
        assert_eq!(
            zoom,
            ErrorBody {
                code: Some(8001),
                message: "Invalid message_id value.".into()
            }
        );
        let listed = parse_error_body(
            br#"{"code":"300","message":"Validation Failed.","result":false,"errors":[{"field":"content","message":"Empty message"},"second"]}"#,
        );
        assert_eq!(listed.code, Some(300));
        assert_eq!(listed.message, "Validation Failed. (Empty message; second)");
        let only_errors = parse_error_body(br#"{"errors":[{"code":7001,"message":"bad body"}]}"#);
        assert_eq!(
            only_errors,
            ErrorBody {
                code: Some(7001),
                message: "bad body".into()
            }
        );
        let oauth = parse_error_body(br#"{"reason":"Invalid client","error":"invalid_client"}"#);
        assert_eq!(oauth.message, "Invalid client");
        let html = parse_error_body(b"<html>\n<body>Bad Gateway</body></html>");
        assert_eq!(
            html,
            ErrorBody {
                code: None,
                message: "<html> <body>Bad Gateway</body></html>".into()
            }
        );
        assert_eq!(parse_error_body(b"").message, "");
        assert_eq!(parse_error_body(b"[1,2]").message, "[1,2]");
    }

    #[test]
    fn excerpts_are_short_and_cut_on_characters() {
        let long = "ü".repeat(500);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
    }
}
