//! Loopback tests of a message's whole life against the scripted fake Zoom of `fake.rs`: the
//! send and what its answer names, the delete's URL and query, and `in_doubt` (whether a failed
//! request may have been applied), which decides whether a send may be repeated.

use super::fake::{hang_up, reply, rig, rig_with, Seen, EDIT_BODY, SEND_BODY};
use super::*;

const ACCOUNT: &str = "acct";
const ROBOT: &str = "bot@xmpp.zoom.us";

fn delivered() -> Outcome {
    Outcome::Delivered {
        status: 200,
        sent: None,
    }
}

fn sent(status: u16, message_id: &str, sent_time: Option<&str>) -> Outcome {
    Outcome::Delivered {
        status,
        sent: Some(Sent {
            message_id: message_id.into(),
            sent_time: sent_time.map(str::to_string),
        }),
    }
}

/// The query's pairs, decoded, to check that every value survives the trip.
fn query_pairs(seen: &Seen) -> Vec<(String, String)> {
    let query = seen.query.as_deref().expect("a query");
    Url::parse(&format!("http://x/?{query}"))
        .unwrap()
        .query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

#[tokio::test]
async fn send_names_the_message() {
    let rig = rig().await;
    assert_eq!(
        rig.send().await,
        sent(201, "sent-1", Some("2019-10-17 01:40:24"))
    );
    let seen = &rig.fake.calls()[0];
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/v2/im/chat/messages");
    assert_eq!(seen.query, None);
    assert_eq!(seen.headers["authorization"], "Bearer tok-1");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["accept"], "application/json");
    assert_eq!(seen.body.as_ref(), SEND_BODY);

    // Zoom's older reference answers 200; `sent_time` is optional; ids are opaque.
    rig.fake.script([reply(
        200,
        r#"{"message_id":"DWQ2A82E-9220-4600-AFB2-A028852E377C","robot_jid":"bot@xmpp.zoom.us"}"#,
    )]);
    assert_eq!(
        rig.send().await,
        sent(200, "DWQ2A82E-9220-4600-AFB2-A028852E377C", None)
    );
    assert_eq!(rig.responses("2xx"), 2);
    assert_eq!(rig.metrics.zoom_request_duration.get_sample_count(), 2);
}

#[tokio::test]
async fn send_without_a_message_id_is_rejected_not_repeated() {
    let rig = rig().await;
    rig.fake.script([
        reply(201, ""),
        reply(201, r#"{"robot_jid":"bot@xmpp.zoom.us","message_id":""}"#),
    ]);
    for quoted in [
        "(no body)",
        r#"{"robot_jid":"bot@xmpp.zoom.us","message_id":""}"#,
    ] {
        assert_eq!(
            rig.send().await,
            Outcome::Rejected {
                status: 201,
                code: None,
                message: format!("Zoom answered 201 to a send without a message_id: {quoted}"),
            }
        );
    }
    assert_eq!(rig.fake.calls().len(), 2);
}

#[tokio::test]
async fn send_edit_delete_lifecycle() {
    let rig = rig().await;
    let Outcome::Delivered {
        sent: Some(Sent { message_id, .. }),
        ..
    } = rig.send().await
    else {
        panic!("the send is delivered");
    };
    assert_eq!(rig.client.edit(&message_id, EDIT_BODY).await, delivered());
    assert_eq!(
        rig.client.delete(&message_id, ACCOUNT, ROBOT, None).await,
        delivered()
    );
    // Deleting it again: Zoom no longer knows the id, which the caller reads as done.
    rig.fake.script([reply(
        404,
        r#"{"code":8001,"message":"Invalid message_id value."}"#,
    )]);
    assert_eq!(
        rig.client.delete(&message_id, ACCOUNT, ROBOT, None).await,
        Outcome::Rejected {
            status: 404,
            code: Some(8001),
            message: "Invalid message_id value.".into()
        }
    );
    let calls = rig.fake.calls();
    let methods: Vec<_> = calls.iter().map(|seen| seen.method.clone()).collect();
    assert_eq!(
        methods,
        [Method::POST, Method::PUT, Method::DELETE, Method::DELETE]
    );
    for seen in &calls[1..] {
        assert_eq!(seen.path, "/v2/im/chat/messages/sent-1");
    }
    assert_eq!(rig.fake.token_requests(), 1);
}

#[tokio::test]
async fn delete_encodes_the_id_as_one_segment_and_every_query_value() {
    let rig = rig().await;
    assert_eq!(
        rig.client
            .delete("a/b c?d#e%f", "acct/1 ?&x=y", ROBOT, None)
            .await,
        delivered()
    );
    assert_eq!(
        rig.client
            .delete("m-2", ACCOUNT, ROBOT, Some("user 1+2@xmpp.zoom.us"))
            .await,
        delivered()
    );
    let calls = rig.fake.calls();
    let (without_user, with_user) = (&calls[0], &calls[1]);
    assert_eq!(without_user.method, Method::DELETE);
    assert_eq!(
        without_user.path,
        "/v2/im/chat/messages/a%2Fb%20c%3Fd%23e%25f"
    );
    assert_eq!(
        without_user.query.as_deref(),
        Some("account_id=acct%2F1+%3F%26x%3Dy&robot_jid=bot%40xmpp.zoom.us")
    );
    assert_eq!(
        query_pairs(without_user),
        pairs(&[("account_id", "acct/1 ?&x=y"), ("robot_jid", ROBOT)])
    );
    assert_eq!(with_user.path, "/v2/im/chat/messages/m-2");
    assert_eq!(
        query_pairs(with_user),
        pairs(&[
            ("account_id", ACCOUNT),
            ("robot_jid", ROBOT),
            ("user_jid", "user 1+2@xmpp.zoom.us")
        ])
    );
    // No body, so no content type; the answer is still asked for as JSON.
    assert!(without_user.body.is_empty());
    assert!(!without_user.headers.contains_key("content-type"));
    assert_eq!(without_user.headers["accept"], "application/json");
    assert_eq!(without_user.headers["authorization"], "Bearer tok-1");

    for dots in ["", ".", ".."] {
        assert!(matches!(
            rig.client.delete(dots, ACCOUNT, ROBOT, None).await,
            Outcome::Rejected { status: 0, .. }
        ));
    }
    assert_eq!(rig.fake.calls().len(), 2);
}

#[tokio::test]
async fn send_server_errors_are_in_doubt_except_503() {
    let rig = rig().await;
    let expected = [(500, true), (502, true), (504, true), (503, false)];
    rig.fake.script(
        expected
            .iter()
            .map(|(status, _)| reply(*status, r#"{"code":0,"message":"oops"}"#)),
    );
    for (status, in_doubt) in expected {
        let outcome = rig.send().await;
        assert!(
            matches!(
                outcome,
                Outcome::Transient { status: Some(s), in_doubt: d, .. } if s == status && d == in_doubt
            ),
            "{status}: {outcome:?}"
        );
    }
    // Never repeated by the client itself.
    assert_eq!(rig.fake.calls().len(), expected.len());
}

#[tokio::test]
async fn connection_closed_after_the_request_is_in_doubt_for_every_call() {
    let rig = rig().await;
    rig.fake.script([hang_up(), hang_up(), hang_up()]);
    let outcomes = [
        rig.send().await,
        rig.edit().await,
        rig.client.delete("m-1", ACCOUNT, ROBOT, None).await,
    ];
    for outcome in outcomes {
        let Outcome::Transient {
            status: None,
            detail,
            in_doubt: true,
        } = outcome
        else {
            panic!("a connection closed after the request is in doubt: {outcome:?}");
        };
        assert!(detail.starts_with("transport error"), "{detail}");
    }
    // Each request reached the fake whole, and none was repeated.
    assert_eq!(rig.fake.calls().len(), 3);
    assert_eq!(rig.fake.calls()[0].body.as_ref(), SEND_BODY);
    assert_eq!(rig.responses("network"), 3);
    // The next connection is answered again.
    assert_eq!(
        rig.send().await,
        sent(201, "sent-4", Some("2019-10-17 01:40:24"))
    );
}

#[tokio::test]
async fn send_to_a_refused_connection_is_not_in_doubt() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let rig = rig_with(|settings| settings.api_base = format!("http://{dead}/v2")).await;
    let outcome = rig.send().await;
    let Outcome::Transient {
        status: None,
        detail,
        in_doubt: false,
    } = outcome
    else {
        panic!("a refused connection never posted the message: {outcome:?}");
    };
    assert!(detail.starts_with("cannot connect"), "{detail}");
    assert_eq!(rig.responses("network"), 1);
}

#[tokio::test]
async fn send_rate_limited_or_with_a_refused_token_was_not_applied() {
    let rig = rig().await;
    rig.fake.script([
        reply(429, r#"{"code":429,"message":"Too many requests."}"#),
        // Refused, then refused again with a fresh token.
        reply(401, r#"{"code":124,"message":"Invalid access token."}"#),
        reply(401, ""),
        // Refused once: Zoom did not act on it, so the send is repeated with a fresh token.
        reply(401, ""),
    ]);
    assert_eq!(
        rig.send().await,
        Outcome::RateLimited {
            kind: LimitKind::Qps,
            retry_after: None,
            limit: None
        }
    );
    assert!(matches!(
        rig.send().await,
        Outcome::Transient {
            status: Some(401),
            in_doubt: false,
            ..
        }
    ));
    assert_eq!(
        rig.send().await,
        sent(201, "sent-5", Some("2019-10-17 01:40:24"))
    );
    assert_eq!(rig.fake.calls().len(), 5);
    assert_eq!(rig.fake.token_requests(), 4);
}
