//! Fuzz target: `zoomq::protocol::parse_request` on arbitrary bytes, as a hostile producer
//! would send them on the socket (one line, newline already cut by the codec).
//!
//! Besides "never panics", it checks what the rest of the daemon relies on:
//! - an accepted edit has identifiers within their limits, non-empty and free of control
//!   characters; its Zoom body is JSON naming exactly its fields, with `content` a non-empty
//!   object kept as the producer's text; and writing the edit back as a request line parses to
//!   the same edit;
//! - an accepted send, delete or status names its message by an identifier within its limits,
//!   and a send's Zoom body is JSON with its `to_jid` and its content as given;
//! - a refusal's answer line is one line of JSON, `{"ok":false,"error":CODE,"message":TEXT}`.
//!
//! "Valid JSON" means RFC 8259's grammar, as the parser itself checks it: content is kept as raw
//! text, so `\u` escapes are not decoded and a lone surrogate such as `"\ud800"` passes (strict
//! Unicode is not enforced; see README.md). Content is therefore read here with `RawValue` keys
//! and ignored values, which serde_json skips without decoding and without recursing, so
//! arbitrarily deep content (also accepted) is checked too.

#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use zoomq::protocol::{
    parse_request, Edit, ProtocolError, Request, Send, Target, MAX_ID_BYTES,
    MAX_MESSAGE_ID_BYTES, MAX_REF_BYTES,
};

fuzz_target!(|line: &[u8]| {
    match parse_request(line) {
        Ok(Request::Edit(edit)) => {
            check_edit(&edit);
            check_round_trip(&edit);
        }
        Ok(Request::Send(send)) => check_send(&send),
        Ok(Request::Delete(delete)) => {
            check_target(&delete.target);
            check_identifier("account_id", &delete.account_id, MAX_ID_BYTES);
            check_identifier("robot_jid", &delete.robot_jid, MAX_ID_BYTES);
        }
        Ok(Request::Status(status)) => {
            check_target(&status.target);
            check_identifier("account_id", &status.account_id, MAX_ID_BYTES);
            check_identifier("robot_jid", &status.robot_jid, MAX_ID_BYTES);
        }
        Ok(_) => {}
        Err(error) => check_error_line(&error),
    }
});

fn check_target(target: &Target) {
    match target {
        Target::MessageId(id) => check_identifier("message_id", id, MAX_MESSAGE_ID_BYTES),
        Target::Ref(reference) => check_identifier("ref", reference, MAX_REF_BYTES),
    }
}

/// A send's Zoom body as the daemon builds it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody<'a> {
    robot_jid: String,
    to_jid: String,
    account_id: String,
    #[serde(borrow)]
    content: &'a RawValue,
    user_jid: Option<String>,
    visible_to_user: Option<String>,
    reply_to: Option<String>,
    is_markdown_support: Option<bool>,
}

fn check_send(send: &Send) {
    check_identifier("ref", &send.reference, MAX_REF_BYTES);
    check_identifier("account_id", &send.account_id, MAX_ID_BYTES);
    check_identifier("robot_jid", &send.robot_jid, MAX_ID_BYTES);
    check_identifier("to_jid", &send.to_jid, MAX_ID_BYTES);
    let body_bytes = send.zoom_body();
    let body: SendBody<'_> = serde_json::from_slice(&body_bytes).unwrap_or_else(|e| {
        panic!(
            "the send's zoom_body is not the expected JSON ({e}): {}",
            String::from_utf8_lossy(&body_bytes)
        )
    });
    assert_eq!(body.robot_jid, send.robot_jid);
    assert_eq!(body.to_jid, send.to_jid);
    assert_eq!(body.account_id, send.account_id);
    assert_eq!(body.user_jid, send.user_jid);
    assert_eq!(body.visible_to_user, send.visible_to_user);
    assert_eq!(body.reply_to, send.reply_to);
    assert_eq!(body.is_markdown_support, send.is_markdown_support);
    assert_eq!(body.content.get(), send.content.get(), "content is sent as given");
}

/// Zoom's request body as the daemon builds it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    robot_jid: String,
    account_id: String,
    #[serde(borrow)]
    content: &'a RawValue,
    user_jid: Option<String>,
    is_markdown_support: Option<bool>,
}

/// An error answer on the wire.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorLine {
    ok: bool,
    error: String,
    message: String,
}

fn check_identifier(field: &str, value: &str, max_bytes: usize) {
    assert!(!value.is_empty(), "{field} is empty");
    assert!(
        value.len() <= max_bytes,
        "{field} is {} bytes, limit {max_bytes}",
        value.len()
    );
    assert!(
        !value.chars().any(char::is_control),
        "{field} has a control character: {value:?}"
    );
}

fn check_edit(edit: &Edit) {
    check_target(&edit.target);
    check_identifier("account_id", &edit.account_id, MAX_ID_BYTES);
    check_identifier("robot_jid", &edit.robot_jid, MAX_ID_BYTES);
    if let Some(user_jid) = &edit.user_jid {
        check_identifier("user_jid", user_jid, MAX_ID_BYTES);
    }

    let body_bytes = edit.zoom_body();
    let body: Body<'_> = serde_json::from_slice(&body_bytes).unwrap_or_else(|e| {
        panic!(
            "zoom_body is not the expected JSON ({e}): {}",
            String::from_utf8_lossy(&body_bytes)
        )
    });
    assert_eq!(body.robot_jid, edit.robot_jid);
    assert_eq!(body.account_id, edit.account_id);
    assert_eq!(body.user_jid, edit.user_jid);
    assert_eq!(body.is_markdown_support, edit.is_markdown_support);
    assert_eq!(
        body.content.get(),
        edit.content.get(),
        "content is sent as given"
    );
    let ObjectLen(members) = serde_json::from_str(body.content.get())
        .unwrap_or_else(|e| panic!("content is not an object ({e}): {}", body.content.get()));
    assert!(members > 0, "content is an empty object");
}

/// The number of members of a JSON object, read without decoding them (see the module
/// documentation).
struct ObjectLen(usize);

impl<'de> Deserialize<'de> for ObjectLen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ObjectLen, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = ObjectLen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectLen, A::Error> {
                let mut members = 0;
                while map.next_entry::<&RawValue, IgnoredAny>()?.is_some() {
                    members += 1;
                }
                Ok(ObjectLen(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// The edit, written back as a request line, parses to the same edit.
fn check_round_trip(edit: &Edit) {
    let mut fields = serde_json::Map::new();
    let mut put = |name: &str, value: &str| {
        fields.insert(name.into(), serde_json::Value::String(value.into()));
    };
    put("op", "edit");
    match &edit.target {
        Target::MessageId(id) => put("message_id", id),
        Target::Ref(reference) => put("ref", reference),
    }
    put("account_id", &edit.account_id);
    put("robot_jid", &edit.robot_jid);
    if let Some(user_jid) = &edit.user_jid {
        put("user_jid", user_jid);
    }
    if let Some(markdown) = edit.is_markdown_support {
        fields.insert("is_markdown_support".into(), markdown.into());
    }
    // Everything but the content, then the content as raw text (it may nest deeper than
    // serde_json's Value would accept).
    let head = serde_json::to_string(&fields).expect("strings serialize");
    let line = format!(
        "{},\"content\":{}}}",
        head.strip_suffix('}').expect("an object"),
        edit.content.get()
    );
    let again = match parse_request(line.as_bytes()) {
        Ok(Request::Edit(again)) => again,
        Ok(other) => panic!("{line} parsed as {other:?}"),
        Err(e) => panic!("{line} refused: {e}"),
    };
    assert_eq!(again.target, edit.target);
    assert_eq!(again.account_id, edit.account_id);
    assert_eq!(again.robot_jid, edit.robot_jid);
    assert_eq!(again.user_jid, edit.user_jid);
    assert_eq!(again.is_markdown_support, edit.is_markdown_support);
    assert_eq!(again.content.get(), edit.content.get());
}

fn check_error_line(error: &ProtocolError) {
    let line = error.to_line();
    assert!(
        !line.contains(['\n', '\r']),
        "an answer must be one line: {line:?}"
    );
    let wire: ErrorLine = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("error line is not the expected JSON ({e}): {line}"));
    assert!(!wire.ok, "error line says ok: {line}");
    assert_eq!(wire.error, error.code.as_str());
    assert_eq!(wire.message, error.message);
    assert!(!wire.message.is_empty(), "error without a message: {line}");
}
