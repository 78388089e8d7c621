//! One message's life over the three calls: a send creates it under a new id, edits change it,
//! a delete ends it; Zoom's codes for each call's mistakes; and the one per-account quota the
//! three calls share.

use std::collections::HashSet;

use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, SandboxConfig};

use crate::{
    body_of, client, delete, edit, edit_body, fresh_window, header, message_url, next_window, send,
    send_body, start, token, ROBOT,
};

const CHANNEL: &str = "builds@conference.xmpp.zoom.us";

/// Room for every request of a test in one per-second window.
fn roomy() -> SandboxConfig {
    SandboxConfig {
        default_plan: Plan::Business,
        ..SandboxConfig::default()
    }
}

fn assert_8001(answer: &Value) {
    assert_eq!(
        answer,
        &json!({"code": 8001, "message": "Invalid message_id value."})
    );
}

#[tokio::test]
async fn a_message_is_sent_edited_and_deleted() {
    let sandbox = start(roomy()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    fresh_window(&sandbox).await;

    let mut body = send_body("acct", CHANNEL, "step 1/7 done");
    body["user_jid"] = json!("user@xmpp.zoom.us");
    body["is_markdown_support"] = json!(true);
    let sent = send(&sandbox, &client, &token, &body).await;
    assert_eq!(sent.status(), 201);
    assert_eq!(header(&sent, "x-ratelimit-remaining"), Some("59"));
    let sent = body_of(sent).await;
    let id = sent["message_id"].as_str().expect("message_id").to_string();
    assert!(!id.is_empty());
    assert_eq!(sent["robot_jid"], ROBOT);
    assert_eq!(sent["to_jid"], CHANNEL);
    assert_eq!(sent["user_jid"], "user@xmpp.zoom.us");
    // "2019-10-17 01:40:24", no offset for a send.
    let sent_time = sent["sent_time"].as_str().unwrap();
    assert_eq!(sent_time.len(), 19, "{sent_time}");
    assert_eq!(sent_time.as_bytes()[10], b' ');
    let record = sandbox.message(&id).expect("the send created it");
    assert_eq!(record.to_jid.as_deref(), Some(CHANNEL));
    assert_eq!(record.content, Some(body["content"].clone()));
    assert_eq!(
        (record.edits, record.deleted, record.requests),
        (0, false, 0)
    );

    let edited = edit_body("acct", "step 2/7 done");
    let response = edit(&sandbox, &client, &token, &id, &edited).await;
    assert_eq!(response.status(), 200);
    let answer = body_of(response).await;
    assert_eq!(answer["message_id"], id.as_str());
    assert_eq!(answer["to_jid"], CHANNEL, "the channel it was sent to");
    let record = sandbox.message(&id).unwrap();
    assert_eq!(record.content, Some(edited["content"].clone()));
    assert_eq!(record.edits, 1);

    let response = delete(&sandbox, &client, &token, &id, "acct").await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "x-ratelimit-remaining").is_some());
    let answer = body_of(response).await;
    assert_eq!(answer["message_id"], id.as_str());
    assert_eq!(answer["robot_jid"], ROBOT);
    assert_eq!(answer["to_jid"], CHANNEL);
    assert_eq!(answer["user_jid"], "");
    assert!(answer["sent_time"].as_str().unwrap().ends_with(" +0000"));
    assert!(sandbox.message(&id).unwrap().deleted);

    let response = edit(&sandbox, &client, &token, &id, &edited).await;
    assert_eq!(response.status(), 404, "an edit of a deleted message");
    assert_8001(&body_of(response).await);
    let response = delete(&sandbox, &client, &token, &id, "acct").await;
    assert_eq!(response.status(), 404, "a delete of a deleted message");
    assert_8001(&body_of(response).await);

    let record = sandbox.message(&id).unwrap();
    assert_eq!(record.edits, 1, "the refused edit changed nothing");
    assert_eq!(record.requests, 4, "two edits and two deletes named it");
    let stats = sandbox.stats();
    assert_eq!(stats.requests_total, 5);
    let by_op: Vec<(&str, u64)> = stats
        .by_op
        .iter()
        .map(|(op, n)| (op.as_str(), *n))
        .collect();
    assert_eq!(by_op, [("delete", 2), ("edit", 2), ("send", 1)]);
    assert_eq!(stats.accounts["acct"].requests, 5);
    let log: Vec<(&str, String, Option<u16>)> = sandbox
        .requests()
        .into_iter()
        .map(|r| (r.op, r.message_id, r.status))
        .collect();
    let expected = [
        ("send", id.clone(), Some(201)),
        ("edit", id.clone(), Some(200)),
        ("delete", id.clone(), Some(200)),
        ("edit", id.clone(), Some(404)),
        ("delete", id.clone(), Some(404)),
    ];
    assert_eq!(log, expected);
}

#[tokio::test]
async fn sends_create_distinct_path_safe_ids_listed_in_creation_order() {
    let sandbox = start(roomy()).await;
    let client = client();
    let token = token(&sandbox, &client).await;

    // An edit of an id the sandbox never saw names a message sent before it started.
    let old = edit(&sandbox, &client, &token, "old-1", &edit_body("acct", "hi")).await;
    assert_eq!(old.status(), 200);
    let mut ids = Vec::new();
    for n in 0..6 {
        let response = send(&sandbox, &client, &token, &send_body("acct", CHANNEL, "hi")).await;
        assert_eq!(response.status(), 201, "send {n}");
        let answer = body_of(response).await;
        assert!(answer.get("user_jid").is_none(), "none was sent: {answer}");
        ids.push(answer["message_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 6, "{ids:?}");
    for id in &ids {
        let path_safe = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        assert!(id.chars().all(path_safe), "{id}");
    }
    // Both of the shapes in Zoom's examples, so a client assuming one finds out.
    assert!(ids.iter().any(|id| id.contains('_')) && ids.iter().any(|id| id.contains('-')));

    let listed: Vec<String> = sandbox
        .messages()
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    let mut expected = vec!["old-1".to_string()];
    expected.extend(ids.iter().cloned());
    assert_eq!(listed, expected);

    let view = client
        .get(format!("http://{}/sandbox/messages", sandbox.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    let view = body_of(view).await;
    assert_eq!(view.as_array().unwrap().len(), 7);
    assert_eq!(view[1]["message_id"], ids[0].as_str());
    assert_eq!(view[1]["to_jid"], CHANNEL);
    assert_eq!(view[0]["to_jid"], Value::Null);
    let one = client
        .get(format!(
            "http://{}/sandbox/messages/{}",
            sandbox.addr(),
            ids[0]
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200, "a sent message is there to see");
}

#[tokio::test]
async fn send_errors_have_zoom_codes() {
    let cfg = SandboxConfig {
        unknown_robots: HashSet::from(["ghost@xmpp.zoom.us".to_string()]),
        forbidden_robots: HashSet::from(["locked@xmpp.zoom.us".to_string()]),
        ..roomy()
    };
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let good = send_body("acct", CHANNEL, "hi");
    let url = format!("{}/im/chat/messages", sandbox.api_base());

    let no_token = client.post(&url).json(&good).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(body_of(no_token).await["code"], 124);

    let mut cases = Vec::new();
    for (field, value) in [
        ("to_jid", json!("")),
        ("to_jid", json!(3)),
        ("content", json!({})),
        ("content", json!("text")),
        ("robot_jid", json!(null)),
        ("user_jid", json!(7)),
        ("visible_to_user", json!(["u1"])),
        ("reply_to", json!(12)),
        ("is_markdown_support", json!("yes")),
        ("reply_main_message_id", json!("m0")),
    ] {
        let mut body = good.clone();
        body[field] = value;
        cases.push((body, field));
    }
    let mut no_to_jid = good.clone();
    no_to_jid.as_object_mut().unwrap().remove("to_jid");
    cases.push((no_to_jid, "to_jid"));
    for (body, problem) in cases {
        let response = send(&sandbox, &client, &token, &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let answer = body_of(response).await;
        assert_eq!(answer["code"], 7001);
        assert!(
            answer["message"].as_str().unwrap().contains(problem),
            "{answer}"
        );
    }
    let not_json = client
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert_eq!(body_of(not_json).await["code"], 7001);

    let mut ghost = good.clone();
    ghost["robot_jid"] = json!("ghost@xmpp.zoom.us");
    let response = send(&sandbox, &client, &token, &ghost).await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        body_of(response).await,
        json!({"code": 7002, "message": "Invalid robot_jid value."})
    );
    let mut locked = good.clone();
    locked["robot_jid"] = json!("locked@xmpp.zoom.us");
    let response = send(&sandbox, &client, &token, &locked).await;
    assert_eq!(response.status(), 403);
    assert_eq!(body_of(response).await["code"], 7004);

    // Optional fields of the right type pass, `null` as absent.
    let mut full = good.clone();
    full["visible_to_user"] = json!("u1");
    full["reply_to"] = json!("20191017014024747_XYYRFjM_main");
    full["is_markdown_support"] = json!(null);
    assert_eq!(send(&sandbox, &client, &token, &full).await.status(), 201);
    assert_eq!(
        sandbox.messages().len(),
        1,
        "only the good send created one"
    );
    let log = sandbox.requests();
    assert!(log.iter().all(|r| r.op == "send"));
    assert!(log[..log.len() - 1].iter().all(|r| r.message_id.is_empty()));
}

#[tokio::test]
async fn deletes_of_unknown_missing_and_malformed_requests() {
    let cfg = SandboxConfig {
        unknown_robots: HashSet::from(["ghost@xmpp.zoom.us".to_string()]),
        ..roomy()
    };
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;

    // An id the sandbox never saw was sent before it started: deleted once, then gone.
    assert_eq!(
        delete(&sandbox, &client, &token, "old-1", "acct")
            .await
            .status(),
        200
    );
    let again = delete(&sandbox, &client, &token, "old-1", "acct").await;
    assert_eq!(again.status(), 404);
    assert_8001(&body_of(again).await);
    let missing = delete(&sandbox, &client, &token, "missing-7", "acct").await;
    assert_eq!(missing.status(), 404);
    assert_8001(&body_of(missing).await);

    let url = |query: &str| format!("{}?{query}", message_url(&sandbox, "m1"));
    for (query, problem, counted) in [
        (format!("robot_jid={ROBOT}"), "account_id", false),
        ("account_id=acct".to_string(), "robot_jid", true),
        (
            format!("account_id=acct&robot_jid={ROBOT}&to=x"),
            "to",
            true,
        ),
    ] {
        let before = sandbox.account("acct").unwrap().requests;
        let response = client
            .delete(url(&query))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let answer = body_of(response).await;
        assert_eq!(answer["code"], 7001);
        assert!(answer["message"].as_str().unwrap().contains(problem));
        let after = sandbox.account("acct").unwrap().requests;
        assert_eq!(after - before, u64::from(counted), "{query}");
    }
    let ghost = client
        .delete(url("account_id=acct&robot_jid=ghost%40xmpp.zoom.us"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ghost.status(), 404);
    assert_eq!(body_of(ghost).await["code"], 7002);
    let no_token = client
        .delete(url(&format!("account_id=acct&robot_jid={ROBOT}")))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert!(!sandbox.message("m1").unwrap().deleted);
}

#[tokio::test]
async fn sends_edits_and_deletes_share_one_quota() {
    let mut cfg = SandboxConfig {
        default_plan: Plan::Free,
        ..SandboxConfig::default()
    };
    cfg.accounts.insert(
        "capped".to_string(),
        AccountSettings {
            capacity_per_second: Some(100),
            daily_limit: Some(3),
            ..AccountSettings::default()
        },
    );
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let edited = edit_body("free", "hi");

    // Free: 2 requests a second, whichever calls they are.
    fresh_window(&sandbox).await;
    let sent = send(&sandbox, &client, &token, &send_body("free", CHANNEL, "hi")).await;
    assert_eq!(sent.status(), 201);
    let id = body_of(sent).await["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        edit(&sandbox, &client, &token, &id, &edited).await.status(),
        200
    );
    let third = delete(&sandbox, &client, &token, &id, "free").await;
    assert_eq!(third.status(), 429);
    assert_eq!(header(&third, "x-ratelimit-type"), Some("QPS"));
    assert!(!sandbox.message(&id).unwrap().deleted);

    next_window(&sandbox).await;
    assert_eq!(
        delete(&sandbox, &client, &token, &id, "free")
            .await
            .status(),
        200
    );
    assert_eq!(
        edit(&sandbox, &client, &token, "m2", &edited)
            .await
            .status(),
        200
    );
    let third = send(&sandbox, &client, &token, &send_body("free", CHANNEL, "hi")).await;
    assert_eq!(third.status(), 429);
    assert_eq!(
        sandbox.messages().len(),
        2,
        "the limited send created nothing"
    );
    let free = sandbox.account("free").unwrap();
    assert_eq!((free.requests, free.rate_limited_qps), (6, 2));
    assert_eq!(free.max_fixed_window, 3);

    // The daily cap counts the three calls alike.
    let sent = send(
        &sandbox,
        &client,
        &token,
        &send_body("capped", CHANNEL, "hi"),
    )
    .await;
    let id = body_of(sent).await["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let capped_edit = edit_body("capped", "hi");
    assert_eq!(
        edit(&sandbox, &client, &token, &id, &capped_edit)
            .await
            .status(),
        200
    );
    assert_eq!(
        delete(&sandbox, &client, &token, &id, "capped")
            .await
            .status(),
        200
    );
    let over = send(
        &sandbox,
        &client,
        &token,
        &send_body("capped", CHANNEL, "hi"),
    )
    .await;
    assert_eq!(over.status(), 429);
    assert_eq!(header(&over, "x-ratelimit-type"), Some("Daily-limit"));
    let capped = sandbox.account("capped").unwrap();
    assert_eq!((capped.daily_used, capped.rate_limited_daily), (3, 1));
}
