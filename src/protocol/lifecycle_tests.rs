//! Parsing tests of the message lifecycle's requests: send, edit by ref, delete, status, with
//! hostile input for every new field.

use super::*;

const SEND: &str = r#"{"op":"send","ref":"build-42","account_id":"a1","robot_jid":"r@xmpp.zoom.us","to_jid":"c@conference.xmpp.zoom.us","content":{"head":{"text":"hi"}}}"#;
const EDIT_BY_REF: &str = r#"{"op":"edit","ref":"build-42","account_id":"a1","robot_jid":"r@xmpp.zoom.us","content":{"head":{"text":"hi"}}}"#;
const DELETE: &str =
    r#"{"op":"delete","ref":"build-42","account_id":"a1","robot_jid":"r@xmpp.zoom.us"}"#;
const STATUS: &str =
    r#"{"op":"status","ref":"build-42","account_id":"a1","robot_jid":"r@xmpp.zoom.us"}"#;

/// `line` with `field` added (or, being JSON, given a second value: serde refuses duplicates,
/// so only use it for fields `line` lacks).
fn with(line: &str, field: &str, value: &str) -> String {
    format!("{},\"{field}\":{value}}}", line.strip_suffix('}').unwrap())
}

/// `line` with the string value of `field` replaced by `value` (raw JSON).
fn replaced(line: &str, field: &str, value: &str) -> String {
    let start = line
        .find(&format!("\"{field}\":\""))
        .unwrap_or_else(|| panic!("no string field {field} in {line}"));
    let value_start = start + field.len() + 3;
    let value_end = value_start + line[value_start + 1..].find('"').unwrap() + 2;
    format!("{}{value}{}", &line[..value_start], &line[value_end..])
}

/// `line` without `field` (a string field not in the first place).
fn without(line: &str, field: &str) -> String {
    let start = line.find(&format!(",\"{field}\":\"")).unwrap();
    let value_start = start + field.len() + 4;
    let end = value_start + line[value_start + 1..].find('"').unwrap() + 2;
    format!("{}{}", &line[..start], &line[end..])
}

/// Every check an identifier field gets, and that the error names the field.
fn hostile_identifier(line: &str, field: &str, max_bytes: usize) {
    let named = |message: String, what: &str| {
        assert!(
            message.contains(&format!("`{field}`")) && message.contains(what),
            "{field}: {message:?} lacks {what:?}"
        );
    };
    named(err(&replaced(line, field, "5")), "expected a string");
    named(err(&replaced(line, field, "true")), "expected a string");
    named(err(&replaced(line, field, "{}")), "expected a string");
    named(err(&replaced(line, field, "[\"x\"]")), "expected a string");
    named(err(&replaced(line, field, "\"\"")), "non-empty");
    named(
        err(&replaced(line, field, "\"a\\u0000b\"")),
        "control character U+0000",
    );
    named(
        err(&replaced(line, field, "\"a\\nb\"")),
        "control character U+000A",
    );
    named(
        err(&replaced(line, field, "\"a\\u009fb\"")),
        "control character U+009F",
    );
    let long = format!("\"{}\"", "x".repeat(max_bytes + 1));
    named(
        err(&replaced(line, field, &long)),
        &format!("at most {max_bytes}"),
    );
    // Bytes, not characters: 86 three-byte characters are 258 bytes.
    let wide = format!("\"{}\"", "€".repeat(max_bytes / 3 + 1));
    named(
        err(&replaced(line, field, &wide)),
        &format!("at most {max_bytes}"),
    );
    let longest = format!("\"{}\"", "x".repeat(max_bytes));
    assert!(
        parse_request(replaced(line, field, &longest).as_bytes()).is_ok(),
        "{field} of {max_bytes} bytes refused"
    );
}

#[test]
fn accepts_a_send_with_every_field() {
    let line = with(
        &with(
            &with(
                &with(SEND, "user_jid", "\"u@xmpp.zoom.us\""),
                "visible_to_user",
                "\"v1\"",
            ),
            "reply_to",
            "\"20191017014024747_XYYRFjM_main\"",
        ),
        "is_markdown_support",
        "true",
    );
    let Request::Send(send) = parse_request(line.as_bytes()).unwrap() else {
        panic!("not a send")
    };
    assert_eq!(send.reference, "build-42");
    assert_eq!(send.to_jid, "c@conference.xmpp.zoom.us");
    assert_eq!(send.user_jid.as_deref(), Some("u@xmpp.zoom.us"));
    assert_eq!(send.visible_to_user.as_deref(), Some("v1"));
    assert_eq!(
        send.reply_to.as_deref(),
        Some("20191017014024747_XYYRFjM_main")
    );
    assert_eq!(send.is_markdown_support, Some(true));
    let body: serde_json::Value = serde_json::from_slice(&send.zoom_body()).unwrap();
    assert_eq!(body["to_jid"], "c@conference.xmpp.zoom.us");
    assert_eq!(body["content"]["head"]["text"], "hi");
    // The ref is zoomq's and the producer's business, not Zoom's.
    assert!(body.get("ref").is_none());
}

#[test]
fn accepts_a_minimal_send_and_null_optionals() {
    let Request::Send(send) = parse_request(SEND.as_bytes()).unwrap() else {
        panic!("not a send")
    };
    assert_eq!(send.user_jid, None);
    assert_eq!(send.visible_to_user, None);
    assert_eq!(send.reply_to, None);
    assert_eq!(send.is_markdown_support, None);
    let line = with(&with(SEND, "reply_to", "null"), "user_jid", "null");
    assert!(matches!(
        parse_request(line.as_bytes()).unwrap(),
        Request::Send(Send {
            reply_to: None,
            user_jid: None,
            ..
        })
    ));
    // A ref may be any text without control characters.
    let line = replaced(SEND, "ref", r#""deploy \"prod\" \\ ✓""#);
    let Request::Send(send) = parse_request(line.as_bytes()).unwrap() else {
        panic!("not a send")
    };
    assert_eq!(send.reference, r#"deploy "prod" \ ✓"#);
}

#[test]
fn refuses_hostile_send_fields() {
    hostile_identifier(SEND, "ref", MAX_REF_BYTES);
    hostile_identifier(SEND, "account_id", MAX_ID_BYTES);
    hostile_identifier(SEND, "robot_jid", MAX_ID_BYTES);
    hostile_identifier(SEND, "to_jid", MAX_ID_BYTES);
    hostile_identifier(&with(SEND, "user_jid", "\"u\""), "user_jid", MAX_ID_BYTES);
    hostile_identifier(
        &with(SEND, "visible_to_user", "\"v\""),
        "visible_to_user",
        MAX_ID_BYTES,
    );
    hostile_identifier(
        &with(SEND, "reply_to", "\"m\""),
        "reply_to",
        MAX_MESSAGE_ID_BYTES,
    );
    for field in ["ref", "account_id", "robot_jid", "to_jid"] {
        assert!(
            err(&without(SEND, field)).contains(&format!("field `{field}` is missing")),
            "{field}"
        );
        assert!(
            err(&replaced(SEND, field, "null")).contains(&format!("field `{field}` is missing")),
            "{field}"
        );
    }
    assert!(err(&with(SEND, "is_markdown_support", "\"yes\""))
        .contains("field `is_markdown_support`: expected true or false, got \"yes\""));
    let no_content = SEND.replace(r#","content":{"head":{"text":"hi"}}"#, "");
    assert!(err(&no_content).contains("field `content` is missing"));
    assert!(err(&SEND.replace(r#"{"head":{"text":"hi"}}"#, "{}")).contains("empty"));
    assert!(err(&SEND.replace(r#"{"head":{"text":"hi"}}"#, "\"hi\"")).contains("JSON object"));
    assert!(err(&with(SEND, "colour", "1")).contains("unknown field `colour`"));
    // A send names its message by its ref only: Zoom has not given it an id yet.
    for (field, value) in [
        ("message_id", "\"m1\""),
        ("wait", "\"1s\""),
        ("job_id", "\"1\""),
        ("all", "true"),
        ("limit", "1"),
    ] {
        assert_eq!(
            err(&with(SEND, field, value)),
            format!("field `{field}` is not allowed in op \"send\""),
        );
    }
}

#[test]
fn accepts_an_edit_by_ref() {
    let Request::Edit(edit) = parse_request(EDIT_BY_REF.as_bytes()).unwrap() else {
        panic!("not an edit")
    };
    assert_eq!(edit.target, Target::Ref("build-42".into()));
    assert_eq!(edit.content.get(), r#"{"head":{"text":"hi"}}"#);
    // A null stands for an absent field, as everywhere.
    let line = with(EDIT_BY_REF, "message_id", "null");
    assert!(matches!(
        parse_request(line.as_bytes()).unwrap(),
        Request::Edit(Edit {
            target: Target::Ref(_),
            ..
        })
    ));
}

#[test]
fn refuses_hostile_edit_targets() {
    hostile_identifier(EDIT_BY_REF, "ref", MAX_REF_BYTES);
    assert_eq!(
        err(&with(EDIT_BY_REF, "message_id", "\"m1\"")),
        "give either `message_id` or `ref`, not both"
    );
    assert_eq!(
        err(&without(EDIT_BY_REF, "ref")),
        "field `message_id` or `ref` is missing"
    );
    assert_eq!(
        err(&replaced(EDIT_BY_REF, "ref", "null")),
        "field `message_id` or `ref` is missing"
    );
    for (field, value) in [
        ("to_jid", "\"c\""),
        ("visible_to_user", "\"v\""),
        ("reply_to", "\"m\""),
        ("wait", "\"1s\""),
    ] {
        assert_eq!(
            err(&with(EDIT_BY_REF, field, value)),
            format!("field `{field}` is not allowed in op \"edit\""),
        );
    }
}

#[test]
fn accepts_deletes_by_ref_and_by_message_id() {
    let Request::Delete(delete) = parse_request(DELETE.as_bytes()).unwrap() else {
        panic!("not a delete")
    };
    assert_eq!(delete.target, Target::Ref("build-42".into()));
    assert_eq!(delete.user_jid, None);
    let line = with(
        &replaced(DELETE, "ref", "\"m1\"").replace("\"ref\"", "\"message_id\""),
        "user_jid",
        "\"u\"",
    );
    let Request::Delete(delete) = parse_request(line.as_bytes()).unwrap() else {
        panic!("not a delete")
    };
    assert_eq!(delete.target, Target::MessageId("m1".into()));
    assert_eq!(delete.user_jid.as_deref(), Some("u"));
}

#[test]
fn refuses_hostile_deletes() {
    hostile_identifier(DELETE, "ref", MAX_REF_BYTES);
    hostile_identifier(
        &DELETE.replace("\"ref\"", "\"message_id\""),
        "message_id",
        MAX_MESSAGE_ID_BYTES,
    );
    hostile_identifier(DELETE, "account_id", MAX_ID_BYTES);
    hostile_identifier(DELETE, "robot_jid", MAX_ID_BYTES);
    hostile_identifier(&with(DELETE, "user_jid", "\"u\""), "user_jid", MAX_ID_BYTES);
    assert_eq!(
        err(&with(DELETE, "message_id", "\"m1\"")),
        "give either `message_id` or `ref`, not both"
    );
    assert_eq!(
        err(&without(DELETE, "ref")),
        "field `message_id` or `ref` is missing"
    );
    assert!(err(&without(DELETE, "robot_jid")).contains("field `robot_jid` is missing"));
    for (field, value) in [
        ("content", "{\"a\":1}"),
        ("is_markdown_support", "true"),
        ("to_jid", "\"c\""),
        ("wait", "\"1s\""),
    ] {
        assert_eq!(
            err(&with(DELETE, field, value)),
            format!("field `{field}` is not allowed in op \"delete\""),
        );
    }
    assert!(err(&with(DELETE, "colour", "1")).contains("unknown field `colour`"));
}

#[test]
fn accepts_status_with_and_without_wait() {
    let Request::Status(query) = parse_request(STATUS.as_bytes()).unwrap() else {
        panic!("not a status")
    };
    assert_eq!(query.target, Target::Ref("build-42".into()));
    assert_eq!(query.wait, None);
    for (text, wait) in [
        ("10s", Duration::from_secs(10)),
        ("500ms", Duration::from_millis(500)),
        ("1m 30s", Duration::from_secs(90)),
        ("0s", Duration::ZERO),
    ] {
        let line = with(STATUS, "wait", &format!("{text:?}"));
        let Request::Status(query) = parse_request(line.as_bytes()).unwrap() else {
            panic!("not a status")
        };
        assert_eq!(query.wait, Some(wait), "{text}");
    }
    let line = with(STATUS, "wait", "null");
    assert!(matches!(
        parse_request(line.as_bytes()).unwrap(),
        Request::Status(StatusQuery { wait: None, .. })
    ));
    let by_id = STATUS.replace("\"ref\"", "\"message_id\"");
    assert!(matches!(
        parse_request(by_id.as_bytes()).unwrap(),
        Request::Status(StatusQuery {
            target: Target::MessageId(_),
            ..
        })
    ));
}

#[test]
fn refuses_hostile_status_queries() {
    hostile_identifier(STATUS, "ref", MAX_REF_BYTES);
    hostile_identifier(STATUS, "account_id", MAX_ID_BYTES);
    hostile_identifier(STATUS, "robot_jid", MAX_ID_BYTES);
    for wait in [
        "10",
        "true",
        "{}",
        "[\"10s\"]",
        "\"\"",
        "\"soon\"",
        "\"10\"",
        "\"-1s\"",
        "\"10 parsecs\"",
    ] {
        let message = err(&with(STATUS, "wait", wait));
        assert!(
            message.starts_with("field `wait`: expected a duration such as \"10s\""),
            "{wait}: {message}"
        );
    }
    // A huge value is refused, and the answer quotes only its start.
    let message = err(&with(STATUS, "wait", &format!("\"{}\"", "9".repeat(5000))));
    assert!(message.len() < 300, "{message}");
    assert_eq!(
        err(&with(STATUS, "message_id", "\"m1\"")),
        "give either `message_id` or `ref`, not both"
    );
    for (field, value) in [
        ("content", "{\"a\":1}"),
        ("user_jid", "\"u\""),
        ("is_markdown_support", "true"),
    ] {
        assert_eq!(
            err(&with(STATUS, field, value)),
            format!("field `{field}` is not allowed in op \"status\""),
        );
    }
}

#[test]
fn the_old_ops_refuse_the_new_fields() {
    for (field, value) in [("ref", "\"r\""), ("wait", "\"1s\""), ("to_jid", "\"c\"")] {
        assert_eq!(
            err(&with(r#"{"op":"ping"}"#, field, value)),
            format!("field `{field}` is not allowed in op \"ping\""),
        );
        assert_eq!(
            err(&with(r#"{"op":"dead_purge","all":true}"#, field, value)),
            format!("field `{field}` is not allowed in op \"dead_purge\""),
        );
    }
}

#[test]
fn an_unknown_op_lists_every_op() {
    let message = err(r#"{"op":"post"}"#);
    for op in [
        "send",
        "edit",
        "delete",
        "status",
        "ping",
        "stats",
        "dead_list",
        "dead_retry",
        "dead_purge",
    ] {
        assert!(message.contains(&format!("\"{op}\"")), "{op}: {message}");
    }
}
