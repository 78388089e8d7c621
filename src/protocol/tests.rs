//! Tests of `protocol`: parsing (good and hostile input) and the wire form of answers.

use std::time::Duration;

use super::*;

#[path = "lifecycle_tests.rs"]
mod lifecycle;

fn err(line: &str) -> String {
    match parse_request(line.as_bytes()) {
        Ok(r) => panic!("accepted {line}: {r:?}"),
        Err(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            e.message
        }
    }
}

const GOOD: &str = r#"{"op":"edit","message_id":"m1","account_id":"a1","robot_jid":"r@xmpp.zoom.us","content":{"head":{"text":"hi"}}}"#;

#[test]
fn accepts_a_good_edit_and_builds_zooms_body() {
    let Request::Edit(edit) = parse_request(GOOD.as_bytes()).unwrap() else {
        panic!("not an edit")
    };
    assert_eq!(edit.target, Target::MessageId("m1".into()));
    let body: serde_json::Value = serde_json::from_slice(&edit.zoom_body()).unwrap();
    assert_eq!(body["content"]["head"]["text"], "hi");
    assert_eq!(body["account_id"], "a1");
    assert!(body.get("user_jid").is_none());
}

#[test]
fn names_the_field_at_fault() {
    assert!(err(&GOOD.replace("\"m1\"", "5")).contains("`message_id`: expected a string"));
    assert!(err(&GOOD.replace("\"m1\"", "\"\"")).contains("`message_id`: expected a non-empty"));
    assert!(err(&GOOD.replace("\"m1\"", "\"a\\u0007b\"")).contains("control character U+0007"));
    let long = format!("\"{}\"", "x".repeat(257));
    assert!(err(&GOOD.replace("\"m1\"", &long)).contains("at most 256"));
    assert!(err(&GOOD.replace(r#"{"head":{"text":"hi"}}"#, "{ }")).contains("empty"));
    assert!(err(&GOOD.replace(r#"{"head":{"text":"hi"}}"#, "[1]")).contains("JSON object"));
    assert!(err(&GOOD.replace(",\"account_id\":\"a1\"", "")).contains("`account_id` is missing"));
    assert!(err(&GOOD.replace("}}}", "}},\"colour\":1}")).contains("unknown field `colour`"));
    assert!(err(r#"{"op":"fly"}"#).contains("unknown operation"));
    assert!(err(r#"{"op":"ping","message_id":"x"}"#).contains("not allowed"));
    assert!(err("{\"op\":").contains("invalid JSON"));
    assert!(err("[]").contains("expected a JSON object"));
    assert!(err("nope").contains("invalid JSON"));
}

#[test]
fn rejects_lone_surrogates_in_content() {
    let line = GOOD.replace(r#""hi""#, r#""\ud800""#);
    assert!(err(&line).contains("invalid string escape"), "{line}");
    // A proper pair is fine.
    let line = GOOD.replace(r#""hi""#, r#""\ud83d\ude00""#);
    assert!(parse_request(line.as_bytes()).is_ok());
}

#[test]
fn rejects_invalid_utf8() {
    let e = parse_request(b"{\"op\":\"ping\xff\"}").unwrap_err();
    assert!(e.message.contains("UTF-8"), "{}", e.message);
}

#[test]
fn dead_letter_selectors() {
    assert!(matches!(
        parse_request(br#"{"op":"dead_retry","job_id":"7"}"#).unwrap(),
        Request::DeadRetry(Selector::One(7))
    ));
    assert!(matches!(
        parse_request(br#"{"op":"dead_purge","all":true}"#).unwrap(),
        Request::DeadPurge(Selector::All)
    ));
    assert!(err(r#"{"op":"dead_purge"}"#).contains("job_id"));
}

#[test]
fn send_answer_escapes_the_ref() {
    assert_eq!(
        send_ok_line(7, "build-42", false),
        r#"{"ok":true,"job_id":"7","ref":"build-42","coalesced":false}"#
    );
    let nasty = "a\"b\\c\u{1}d\u{2028}✓\"}";
    let line = send_ok_line(u64::MAX, nasty, true);
    assert!(!line.contains('\n'));
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["job_id"], u64::MAX.to_string());
    assert_eq!(answer["ref"], nasty);
    assert_eq!(answer["coalesced"], true);
    assert_eq!(answer.as_object().unwrap().len(), 4);
}

#[test]
fn delete_answers() {
    assert_eq!(
        delete_ok_line(Some(9), false),
        r#"{"ok":true,"job_id":"9"}"#
    );
    assert_eq!(
        delete_ok_line(None, true),
        r#"{"ok":true,"cancelled":true}"#
    );
    assert_eq!(
        delete_ok_line(Some(9), true),
        r#"{"ok":true,"cancelled":true}"#
    );
    assert_eq!(delete_ok_line(None, false), r#"{"ok":true}"#);
}

#[test]
fn status_answer_shape() {
    let mut status = MessageStatus {
        state: MessageState::Sent,
        message_id: Some("20191017014024747_XYYRFjM_main".into()),
        sent_time: Some("2019-10-17 01:40:24 +0000".into()),
        reason: None,
        job_id: None,
        reference: None,
    };
    assert_eq!(
        status_line(&status),
        r#"{"ok":true,"state":"sent","message_id":"20191017014024747_XYYRFjM_main","sent_time":"2019-10-17 01:40:24 +0000"}"#
    );
    status.state = MessageState::InFlight;
    status.reference = Some("r\"1".into());
    status.job_id = Some("4".into());
    assert_eq!(
        status_line(&status),
        r#"{"ok":true,"state":"in_flight","message_id":"20191017014024747_XYYRFjM_main","sent_time":"2019-10-17 01:40:24 +0000","job_id":"4","ref":"r\"1"}"#
    );
    // What the daemon writes, the client reads back (`ok` and unknown fields ignored).
    let back: MessageStatus = serde_json::from_str(&status_line(&status)).unwrap();
    assert_eq!(back, status);
    let dead: MessageStatus =
        serde_json::from_str(r#"{"state":"dead","reason":"outcome_unknown"}"#).unwrap();
    assert_eq!(dead.state, MessageState::Dead);
    assert_eq!(dead.reason.as_deref(), Some("outcome_unknown"));
    assert_eq!(dead.message_id, None);
    for (state, wire) in [
        (MessageState::Pending, "\"pending\""),
        (MessageState::InFlight, "\"in_flight\""),
        (MessageState::Sent, "\"sent\""),
        (MessageState::Deleted, "\"deleted\""),
        (MessageState::Dead, "\"dead\""),
    ] {
        assert_eq!(serde_json::to_string(&state).unwrap(), wire);
    }
}

#[test]
fn error_codes_on_the_wire() {
    assert_eq!(ALL_ERROR_CODES.len(), 8);
    for code in ALL_ERROR_CODES {
        let line = ProtocolError::new(code, "x").to_line();
        assert!(
            line.contains(&format!("\"error\":\"{}\"", code.as_str())),
            "{line}"
        );
    }
    assert_eq!(ErrorCode::NotFound.as_str(), "not_found");
    assert_eq!(ErrorCode::Gone.as_str(), "gone");
    assert_eq!(
        ProtocolError::new(ErrorCode::Gone, "deleted").to_line(),
        r#"{"ok":false,"error":"gone","message":"deleted"}"#
    );
}
