//! The edit call: Zoom's success body, the 204 variant, and Zoom's error codes.

use std::collections::HashSet;

use serde_json::json;
use zoomq::plan::Plan;
use zoomq::sandbox::SandboxConfig;

use crate::{
    body_of, client, edit, edit_body, fresh_window, header, message_url, start, token, ROBOT,
};

#[tokio::test]
async fn edit_succeeds_with_zoom_body_and_records_the_message() {
    let sandbox = start(SandboxConfig::default()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    fresh_window(&sandbox).await;

    let mut body = edit_body("acct", "step 3/7 done");
    body["user_jid"] = json!("user@xmpp.zoom.us");
    let response = edit(&sandbox, &client, &token, "201910tryyRFjM_main", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ratelimit-remaining"), Some("19"));
    assert_eq!(header(&response, "x-ratelimit-limit"), Some("20"));
    let answer = body_of(response).await;
    assert_eq!(answer["message_id"], "201910tryyRFjM_main");
    assert_eq!(answer["robot_jid"], ROBOT);
    assert_eq!(answer["user_jid"], "user@xmpp.zoom.us");
    assert!(answer["to_jid"].is_string());
    let sent_time = answer["sent_time"].as_str().unwrap();
    // "2019-10-17 01:40:24 +0000"
    assert_eq!(sent_time.len(), 25, "{sent_time}");
    assert!(sent_time.ends_with(" +0000") && sent_time.as_bytes()[10] == b' ');

    let record = sandbox
        .message("201910tryyRFjM_main")
        .expect("message recorded");
    assert_eq!(record.edits, 1);
    assert_eq!(record.content, Some(body["content"].clone()));
    assert_eq!(record.last_body, Some(body.clone()));
    assert_eq!(record.max_concurrent, 1);

    // The message id is one percent-encoded path segment.
    let response = edit(&sandbox, &client, &token, "a%2Fb%20c", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(sandbox.message("a/b c").unwrap().edits, 1);

    let account = sandbox.account("acct").unwrap();
    assert_eq!(
        (account.plan, account.successes, account.requests),
        (Plan::Pro, 2, 2)
    );
}

#[tokio::test]
async fn edit_can_answer_204_without_body() {
    let cfg = SandboxConfig {
        respond_204: true,
        ..SandboxConfig::default()
    };
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;

    let response = edit(&sandbox, &client, &token, "m1", &edit_body("acct", "hi")).await;
    assert_eq!(response.status(), 204);
    assert!(header(&response, "x-ratelimit-remaining").is_some());
    assert!(response.bytes().await.unwrap().is_empty());
    assert_eq!(sandbox.message("m1").unwrap().edits, 1);
}

#[tokio::test]
async fn edit_errors_have_zoom_codes() {
    let cfg = SandboxConfig {
        unknown_robots: HashSet::from(["ghost@xmpp.zoom.us".to_string()]),
        forbidden_robots: HashSet::from(["locked@xmpp.zoom.us".to_string()]),
        missing_messages: HashSet::from(["gone".to_string()]),
        ..SandboxConfig::default()
    };
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let good = edit_body("acct", "hi");

    // 401 code 124: no token, unknown token, wrong scheme.
    let no_token = client.put(message_url(&sandbox, "m1")).json(&good);
    let bad_token = client
        .put(message_url(&sandbox, "m1"))
        .bearer_auth("forged")
        .json(&good);
    let basic = client
        .put(message_url(&sandbox, "m1"))
        .basic_auth(&token, None::<&str>)
        .json(&good);
    for request in [no_token, bad_token, basic] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            body_of(response).await,
            json!({"code": 124, "message": "Invalid access token."})
        );
    }

    // 400 code 7001, naming the problem.
    let mut cases = Vec::new();
    for (field, value, problem) in [
        ("content", json!({}), "content"),
        ("content", json!("text"), "content"),
        ("robot_jid", json!(""), "robot_jid"),
        ("robot_jid", json!(7), "robot_jid"),
        ("user_jid", json!(false), "user_jid"),
        ("is_markdown_support", json!("yes"), "is_markdown_support"),
        ("account_id", json!(""), "account_id"),
        ("surprise", json!(1), "surprise"),
    ] {
        let mut body = good.clone();
        body[field] = value;
        cases.push((body, problem));
    }
    let mut no_content = good.clone();
    no_content.as_object_mut().unwrap().remove("content");
    cases.push((no_content, "content"));
    cases.push((json!([1, 2]), "JSON object"));
    for (body, problem) in cases {
        let response = edit(&sandbox, &client, &token, "m1", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let answer = body_of(response).await;
        assert_eq!(answer["code"], 7001);
        assert!(
            answer["message"].as_str().unwrap().contains(problem),
            "{answer}"
        );
    }
    let not_json = client
        .put(message_url(&sandbox, "m1"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert!(body_of(not_json).await["message"]
        .as_str()
        .unwrap()
        .contains("Content-Type"));

    // 404 7002, 403 7004, 404 8001.
    let mut ghost = good.clone();
    ghost["robot_jid"] = json!("ghost@xmpp.zoom.us");
    let response = edit(&sandbox, &client, &token, "m1", &ghost).await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        body_of(response).await,
        json!({"code": 7002, "message": "Invalid robot_jid value."})
    );

    let mut locked = good.clone();
    locked["robot_jid"] = json!("locked@xmpp.zoom.us");
    let response = edit(&sandbox, &client, &token, "m1", &locked).await;
    assert_eq!(response.status(), 403);
    assert_eq!(body_of(response).await["code"], 7004);

    for message_id in ["gone", "missing-42"] {
        let response = edit(&sandbox, &client, &token, message_id, &good).await;
        assert_eq!(response.status(), 404);
        assert_eq!(
            body_of(response).await,
            json!({"code": 8001, "message": "Invalid message_id value."})
        );
    }
    assert_eq!(sandbox.message("m1").unwrap().edits, 0);
    assert_eq!(sandbox.stats().by_status.get(&200), None);
}
