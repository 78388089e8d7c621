//! Each message call's parameters as Zoom's schema has them: the body of a send or an edit, the
//! query of a delete. A request that breaks its schema is answered 400 code 7001 with a message
//! naming the problem, so a client's bug surfaces in the sandbox rather than in production.
//!
//! `null` optional fields count as absent; unknown fields are rejected so typos surface.

use serde_json::{Map, Value};

use super::calls::Op;

/// What one parameter must be.
#[derive(Clone, Copy)]
enum Kind {
    /// A non-empty string, required.
    Jid,
    /// A non-empty JSON object (the message template), required: Zoom rejects empty messages.
    Content,
    /// A string, optional.
    Text,
    /// A boolean, optional.
    Flag,
}

use Kind::{Content, Flag, Jid, Text};

/// `POST /v2/im/chat/messages`. Zoom's OpenAPI marks `user_jid` required but its guide says
/// only user-managed apps need it, so the sandbox takes both kinds of app.
const SEND: &[(&str, Kind)] = &[
    ("robot_jid", Jid),
    ("to_jid", Jid),
    ("account_id", Jid),
    ("content", Content),
    ("user_jid", Text),
    ("visible_to_user", Text),
    ("reply_to", Text),
    ("is_markdown_support", Flag),
];

/// `PUT /v2/im/chat/messages/{message_id}`.
const EDIT: &[(&str, Kind)] = &[
    ("robot_jid", Jid),
    ("account_id", Jid),
    ("content", Content),
    ("user_jid", Text),
    ("is_markdown_support", Flag),
];

/// `DELETE /v2/im/chat/messages/{message_id}`, whose parameters are all in the query.
const DELETE: &[(&str, Kind)] = &[("robot_jid", Jid), ("account_id", Jid), ("user_jid", Text)];

/// Checks `params` (the JSON body, or the query of a delete as an object of strings) against
/// the call's schema; `Err` is the 7001 message.
pub(crate) fn validate(op: Op, params: &Map<String, Value>) -> Result<(), String> {
    let (schema, noun) = match op {
        Op::Send => (SEND, "field"),
        Op::Edit => (EDIT, "field"),
        Op::Delete => (DELETE, "query parameter"),
    };
    if let Some(unknown) = params
        .keys()
        .find(|name| !schema.iter().any(|(known, _)| known == name))
    {
        let noun = noun[..1].to_uppercase() + &noun[1..];
        return Err(format!("Unknown {noun}: {unknown}."));
    }
    for &(name, kind) in schema {
        let value = params.get(name);
        let valid = match kind {
            Jid => value.and_then(Value::as_str).is_some_and(|s| !s.is_empty()),
            Content => value
                .and_then(Value::as_object)
                .is_some_and(|content| !content.is_empty()),
            Text => matches!(value, None | Some(Value::Null | Value::String(_))),
            Flag => matches!(value, None | Some(Value::Null | Value::Bool(_))),
        };
        if valid {
            continue;
        }
        return Err(match kind {
            Jid => format!("{name} is required and must be a non-empty string."),
            Content if value.is_some_and(Value::is_object) => {
                format!("{name} must not be empty.")
            }
            Content => format!("{name} is required and must be a JSON object."),
            Text => format!("{name} must be a string."),
            Flag => format!("{name} must be a boolean."),
        });
    }
    Ok(())
}
