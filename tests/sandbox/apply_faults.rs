//! The faults a client retrying sends must be tested against: a reset or 5xx before the request
//! is applied leaves nothing behind, one after it leaves the message created, edited or deleted
//! although the client heard no success; and the scripts that pick one request for either.

use std::time::Duration;

use serde_json::json;
use zoomq::plan::Plan;
use zoomq::sandbox::{Faults, SandboxConfig, Scripted};

use crate::{body_of, client, delete, edit, edit_body, message_url, send, send_body, start, token};

const CHANNEL: &str = "builds@conference.xmpp.zoom.us";

/// Room for every request of a test in one per-second window.
fn roomy() -> SandboxConfig {
    SandboxConfig {
        default_plan: Plan::Business,
        ..SandboxConfig::default()
    }
}

/// A send whose connection the sandbox closes: the transport error the client sees.
async fn send_unanswered(sandbox: &zoomq::sandbox::Sandbox, token: &str, body: &serde_json::Value) {
    let error = client()
        .post(format!("{}/im/chat/messages", sandbox.api_base()))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect_err("the connection is reset");
    assert!(error.status().is_none(), "{error:?}");
}

#[tokio::test]
async fn a_send_faulted_after_apply_is_posted_one_faulted_before_is_not() {
    let sandbox = start(roomy()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = send_body("acct", CHANNEL, "hi");

    // Before apply: the client sees a reset, Zoom has nothing. A retry would be safe.
    sandbox.set_faults(Faults {
        reset: 1.0,
        // The earlier fault wins: the request is never applied.
        reset_after_apply: 1.0,
        ..Faults::default()
    });
    send_unanswered(&sandbox, &token, &body).await;
    assert!(sandbox.messages().is_empty());
    let log = sandbox.requests();
    assert_eq!((log[0].op, log[0].message_id.as_str()), ("send", ""));

    // After apply: the same transport error, but the message is posted. A retry would post it
    // twice.
    sandbox.set_faults(Faults {
        reset_after_apply: 1.0,
        ..Faults::default()
    });
    send_unanswered(&sandbox, &token, &body).await;
    let messages = sandbox.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].to_jid.as_deref(), Some(CHANNEL));
    assert_eq!(messages[0].content, Some(body["content"].clone()));
    let logged = sandbox.requests().pop().unwrap();
    assert_eq!(
        logged.message_id, messages[0].message_id,
        "the id it created"
    );
    assert_eq!(logged.status, None);

    sandbox.set_faults(Faults {
        error_5xx_after_apply: 1.0,
        ..Faults::default()
    });
    let response = send(&sandbox, &client, &token, &body).await;
    let status = response.status().as_u16();
    assert!([500, 502, 504].contains(&status), "{status}");
    assert_eq!(body_of(response).await["code"], status);
    assert_eq!(
        sandbox.messages().len(),
        2,
        "created although answered {status}"
    );

    sandbox.set_faults(Faults {
        error_5xx: 1.0,
        ..Faults::default()
    });
    let response = send(&sandbox, &client, &token, &body).await;
    assert!(response.status().is_server_error());
    assert_eq!(
        sandbox.messages().len(),
        2,
        "a 5xx before apply creates nothing"
    );

    // A request that fails on its own applies nothing, so it keeps its own answer.
    sandbox.set_faults(Faults {
        reset_after_apply: 1.0,
        ..Faults::default()
    });
    let mut bad = body.clone();
    bad["content"] = json!({});
    assert_eq!(send(&sandbox, &client, &token, &bad).await.status(), 400);

    let stats = sandbox.stats();
    assert_eq!(stats.resets, 2);
    assert_eq!(stats.by_op["send"], 5);
    assert_eq!(
        stats.accounts["acct"].requests, 5,
        "faulted requests use quota"
    );
}

#[tokio::test]
async fn edits_and_deletes_faulted_after_apply_are_applied() {
    let sandbox = start(roomy()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("acct", "new text");

    sandbox.set_faults(Faults {
        error_5xx_after_apply: 1.0,
        ..Faults::default()
    });
    let response = edit(&sandbox, &client, &token, "m1", &body).await;
    assert!(response.status().is_server_error());
    let record = sandbox.message("m1").unwrap();
    assert_eq!(
        (record.edits, record.content),
        (1, Some(body["content"].clone()))
    );

    sandbox.set_faults(Faults {
        reset_after_apply: 1.0,
        ..Faults::default()
    });
    let query = format!("account_id=acct&robot_jid={}", crate::ROBOT);
    let error = client
        .delete(format!("{}?{query}", message_url(&sandbox, "m1")))
        .bearer_auth(&token)
        .send()
        .await
        .expect_err("the connection is reset");
    assert!(error.status().is_none());
    assert!(sandbox.message("m1").unwrap().deleted);

    // The client's retry of the delete finds it gone: Zoom's 404 8001.
    sandbox.set_faults(Faults::default());
    let retry = delete(&sandbox, &client, &token, "m1", "acct").await;
    assert_eq!(retry.status(), 404);
    assert_eq!(body_of(retry).await["code"], 8001);
}

#[tokio::test]
async fn script_send_answers_the_sends_to_one_jid() {
    let sandbox = start(roomy()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let scripted = send_body("acct", "scripted@conference.xmpp.zoom.us", "hi");
    let other = send_body("acct", CHANNEL, "hi");
    sandbox.script_send(
        "scripted@conference.xmpp.zoom.us",
        vec![
            Scripted::status(503),
            Scripted::Reset,
            Scripted::ResetAfterApply,
            Scripted::status_after_apply(504),
            Scripted::Delay(Duration::from_millis(50)),
        ],
    );

    // Sends elsewhere are not scripted.
    assert_eq!(send(&sandbox, &client, &token, &other).await.status(), 201);
    let response = send(&sandbox, &client, &token, &scripted).await;
    assert_eq!(response.status(), 503);
    send_unanswered(&sandbox, &token, &scripted).await;
    assert_eq!(
        sandbox.messages().len(),
        1,
        "a status or reset creates nothing"
    );

    send_unanswered(&sandbox, &token, &scripted).await;
    assert_eq!(sandbox.messages().len(), 2, "created, then the reset");
    let response = send(&sandbox, &client, &token, &scripted).await;
    assert_eq!(response.status(), 504);
    assert_eq!(sandbox.messages().len(), 3, "created, then the 504");
    let response = send(&sandbox, &client, &token, &scripted).await;
    assert_eq!(response.status(), 201, "delayed, then handled as usual");
    assert_eq!(
        send(&sandbox, &client, &token, &scripted).await.status(),
        201
    );

    let scripted_jid = Some("scripted@conference.xmpp.zoom.us");
    let posted = sandbox.messages();
    let posted = posted
        .iter()
        .filter(|m| m.to_jid.as_deref() == scripted_jid);
    assert_eq!(posted.count(), 4);
    assert_eq!(
        sandbox.account("acct").unwrap().requests,
        5,
        "scripted statuses and resets use no quota"
    );
}

#[tokio::test]
async fn message_scripts_apply_to_edits_and_deletes() {
    let sandbox = start(roomy()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("acct", "hi");
    sandbox.script(
        "m1",
        vec![
            Scripted::status(500),
            Scripted::StatusAfterApply {
                status: 502,
                headers: vec![("X-Custom".to_string(), "yes".to_string())],
                body: None,
            },
            Scripted::ResetAfterApply,
        ],
    );

    let response = delete(&sandbox, &client, &token, "m1", "acct").await;
    assert_eq!(response.status(), 500);
    assert!(!sandbox.message("m1").unwrap().deleted);
    let response = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-custom"], "yes");
    assert_eq!(sandbox.message("m1").unwrap().edits, 1);
    let query = format!("account_id=acct&robot_jid={}", crate::ROBOT);
    let reset = client
        .delete(format!("{}?{query}", message_url(&sandbox, "m1")))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(reset.is_err());
    assert!(sandbox.message("m1").unwrap().deleted);

    // Edits and deletes of one message count together in its concurrency high-water mark.
    let delay = Scripted::Delay(Duration::from_millis(150));
    sandbox.script("m2", vec![delay.clone(), delay]);
    let (edited, deleted) = tokio::join!(
        edit(&sandbox, &client, &token, "m2", &body),
        delete(&sandbox, &client, &token, "m2", "acct"),
    );
    // Which ran first is up to the scheduler; the delete succeeds either way.
    assert!([200, 404].contains(&edited.status().as_u16()));
    assert_eq!(deleted.status(), 200);
    assert_eq!(sandbox.message("m2").unwrap().max_concurrent, 2);
}
