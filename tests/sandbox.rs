//! Integration tests of the local Zoom sandbox, over real HTTP on loopback with reqwest.
//!
//! Each test starts its own sandbox on an ephemeral port. Tests that depend on the fixed
//! per-second windows first wait for a fresh window (see `fresh_window`), so they hold however
//! the scheduler delays them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{
    AccountSettings, AccountStats, Faults, RetryAfterForm, Sandbox, SandboxConfig, Scripted,
};

const ROBOT: &str = "v1pky3tyBBB5pl8q@xmpp.zoom.us";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

async fn start(cfg: SandboxConfig) -> Sandbox {
    Sandbox::start(cfg).await.expect("sandbox starts")
}

async fn token(sandbox: &Sandbox, client: &reqwest::Client) -> String {
    let response = client
        .post(format!(
            "{}?grant_type=client_credentials",
            sandbox.token_url()
        ))
        .basic_auth("sandbox-client", Some("sandbox-secret"))
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("token body");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

fn edit_body(account_id: &str, text: &str) -> Value {
    json!({
        "robot_jid": ROBOT,
        "account_id": account_id,
        "content": {"head": {"text": "Build 42"}, "body": [{"type": "message", "text": text}]},
        "is_markdown_support": false,
    })
}

fn message_url(sandbox: &Sandbox, message_id: &str) -> String {
    format!("{}/im/chat/messages/{message_id}", sandbox.api_base())
}

async fn edit(
    sandbox: &Sandbox,
    client: &reqwest::Client,
    token: &str,
    message_id: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .put(message_url(sandbox, message_id))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("edit request")
}

async fn body_of(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Waits until at least 300 ms remain in the current fixed window, so a short burst lands in
/// one window.
async fn fresh_window(sandbox: &Sandbox) {
    let into_window = sandbox.started().elapsed().subsec_millis();
    if into_window > 700 {
        tokio::time::sleep(Duration::from_millis(u64::from(1_010 - into_window))).await;
    }
}

/// Waits for the start of the next fixed window.
async fn next_window(sandbox: &Sandbox) {
    let into_window = sandbox.started().elapsed().subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1_010 - into_window))).await;
}

#[tokio::test]
async fn token_grant_type_in_query_or_form_body() {
    let sandbox = start(SandboxConfig::default()).await;
    let client = client();

    let by_query = client
        .post(format!(
            "{}?grant_type=client_credentials",
            sandbox.token_url()
        ))
        .basic_auth("sandbox-client", Some("sandbox-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    let by_query = body_of(by_query).await;
    assert_eq!(by_query["token_type"], "bearer");
    assert_eq!(by_query["expires_in"], 3600);
    assert_eq!(by_query["scope"], "imchat:bot");
    assert_eq!(by_query["api_url"], format!("http://{}", sandbox.addr()));

    let by_form = client
        .post(sandbox.token_url())
        .basic_auth("sandbox-client", Some("sandbox-secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(by_form.status(), 200);
    let by_form = body_of(by_form).await;
    assert_ne!(by_form["access_token"], by_query["access_token"]);

    // Issuing a second token does not invalidate the first.
    for issued in [&by_query, &by_form] {
        let token = issued["access_token"].as_str().unwrap();
        let response = edit(&sandbox, &client, token, "m1", &edit_body("acct", "hi")).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(sandbox.stats().token_requests, 2);
    assert_eq!(sandbox.stats().tokens_issued, 2);
}

#[tokio::test]
async fn token_rejects_bad_credentials_and_grant_types() {
    let sandbox = start(SandboxConfig::default()).await;
    let client = client();
    let url = format!("{}?grant_type=client_credentials", sandbox.token_url());

    let invalid_client =
        json!({"reason": "Invalid client_id or client_secret", "error": "invalid_client"});
    let wrong_secret = client.post(&url).basic_auth("sandbox-client", Some("nope"));
    let no_auth = client.post(&url);
    let not_basic = client
        .post(&url)
        .bearer_auth("sandbox-client:sandbox-secret");
    for request in [wrong_secret, no_auth, not_basic] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(body_of(response).await, invalid_client);
    }

    let unsupported =
        json!({"reason": "unsupported grant type", "error": "unsupported_grant_type"});
    let missing = sandbox.token_url();
    let wrong = format!("{}?grant_type=password", sandbox.token_url());
    for url in [missing, wrong] {
        let response = client
            .post(url)
            .basic_auth("sandbox-client", Some("sandbox-secret"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(body_of(response).await, unsupported);
    }
    assert_eq!(sandbox.stats().tokens_issued, 0);
    assert_eq!(sandbox.stats().token_requests, 5);
}

#[tokio::test]
async fn tokens_expire_after_ttl_on_demand_and_when_too_many_are_issued() {
    let cfg = SandboxConfig {
        token_ttl: Duration::from_millis(300),
        ..SandboxConfig::default()
    };
    let sandbox = start(cfg).await;
    let client = client();
    let body = edit_body("acct", "hi");

    let response = client
        .post(format!(
            "{}?grant_type=client_credentials",
            sandbox.token_url()
        ))
        .basic_auth("sandbox-client", Some("sandbox-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(body_of(response).await["expires_in"], 1, "at least 1 s");

    let short_lived = token(&sandbox, &client).await;
    assert_eq!(
        edit(&sandbox, &client, &short_lived, "m1", &body)
            .await
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        edit(&sandbox, &client, &short_lived, "m1", &body)
            .await
            .status(),
        401
    );

    sandbox.configure(|cfg| cfg.token_ttl = Duration::from_secs(60));
    let live = token(&sandbox, &client).await;
    assert_eq!(
        edit(&sandbox, &client, &live, "m1", &body).await.status(),
        200
    );
    sandbox.expire_tokens();
    assert_eq!(
        edit(&sandbox, &client, &live, "m1", &body).await.status(),
        401
    );

    sandbox.configure(|cfg| cfg.max_live_tokens = Some(1));
    let older = token(&sandbox, &client).await;
    let newer = token(&sandbox, &client).await;
    assert_eq!(
        edit(&sandbox, &client, &older, "m1", &body).await.status(),
        401
    );
    assert_eq!(
        edit(&sandbox, &client, &newer, "m1", &body).await.status(),
        200
    );
}

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

#[tokio::test]
async fn per_second_limit_answers_429_with_headers() {
    let mut cfg = SandboxConfig::default();
    cfg.accounts.insert(
        "free".to_string(),
        AccountSettings {
            plan: Some(Plan::Free),
            ..AccountSettings::default()
        },
    );
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("free", "hi");
    fresh_window(&sandbox).await;

    let first = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(header(&first, "x-ratelimit-remaining"), Some("1"));
    let second = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(header(&second, "x-ratelimit-remaining"), Some("0"));
    let third = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(third.status(), 429);
    assert_eq!(header(&third, "x-ratelimit-category"), Some("Medium"));
    assert_eq!(header(&third, "x-ratelimit-type"), Some("QPS"));
    assert_eq!(header(&third, "x-ratelimit-limit"), Some("2"));
    assert_eq!(header(&third, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&third, "retry-after"),
        None,
        "no Retry-After unless configured"
    );
    assert_eq!(
        body_of(third).await,
        json!({"code": 429, "message": "You have reached the maximum per-second rate limit for this API. Try again later."})
    );

    // Another account has its own quota; the Free one recovers in the next window.
    let other = edit(&sandbox, &client, &token, "m2", &edit_body("pro", "hi")).await;
    assert_eq!(other.status(), 200);
    sandbox.configure(|cfg| cfg.qps_retry_after = Some(RetryAfterForm::Seconds));
    let _ = edit(&sandbox, &client, &token, "m1", &body).await;
    let limited = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(header(&limited, "retry-after"), Some("1"));
    next_window(&sandbox).await;
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );

    let account = sandbox.account("free").unwrap();
    assert_eq!(account.successes, 3);
    assert_eq!((account.rate_limited, account.rate_limited_qps), (3, 3));
    assert_eq!(
        account.max_fixed_window, 5,
        "every request with a token counts"
    );
    assert_eq!(account.requests, 6);
    assert_eq!(sandbox.message("m1").unwrap().edits, 3);
}

#[tokio::test]
async fn capacity_override_leaves_the_plan_limit_in_headers() {
    let mut cfg = SandboxConfig::default();
    cfg.accounts.insert(
        "shared".to_string(),
        AccountSettings {
            capacity_per_second: Some(12),
            ..AccountSettings::default()
        },
    );
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("shared", "hi");
    fresh_window(&sandbox).await;

    for n in 1..=12 {
        let response = edit(&sandbox, &client, &token, "m1", &body).await;
        assert_eq!(response.status(), 200, "request {n}");
        assert_eq!(
            header(&response, "x-ratelimit-remaining"),
            Some((12 - n).to_string().as_str())
        );
    }
    let limited = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "x-ratelimit-limit"), Some("20"));

    // Changing the settings at runtime takes effect at once.
    sandbox.set_account("shared", AccountSettings::default());
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );
    let stats = sandbox.account("shared").unwrap();
    assert_eq!((stats.capacity_per_second, stats.rate_limited_qps), (20, 1));
}

#[tokio::test]
async fn daily_limit_answers_429_until_midnight_utc() {
    let mut cfg = SandboxConfig {
        default_plan: Plan::Free,
        daily_limit: Some(3),
        ..SandboxConfig::default()
    };
    // Lift the per-second limit so only the daily cap shows.
    let roomy = AccountSettings {
        capacity_per_second: Some(100),
        ..AccountSettings::default()
    };
    cfg.accounts.insert("free".to_string(), roomy.clone());
    cfg.accounts.insert(
        "pro-capped".to_string(),
        AccountSettings {
            plan: Some(Plan::Pro),
            daily_limit: Some(1),
            ..AccountSettings::default()
        },
    );
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("free", "hi");

    for _ in 0..3 {
        assert_eq!(
            edit(&sandbox, &client, &token, "m1", &body).await.status(),
            200
        );
    }
    let limited = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "x-ratelimit-type"), Some("Daily-limit"));
    assert_eq!(header(&limited, "x-ratelimit-limit"), Some("3"));
    let retry_after = header(&limited, "retry-after").unwrap().to_string();
    assert!(
        retry_after.ends_with("T00:00:00Z") && retry_after.len() == 20,
        "{retry_after}"
    );
    let answer = body_of(limited).await;
    assert_eq!(answer["code"], 429);
    assert!(answer["message"].as_str().unwrap().contains("daily"));

    sandbox.configure(|cfg| cfg.daily_retry_after = Some(RetryAfterForm::HttpDate));
    let limited = edit(&sandbox, &client, &token, "m1", &body).await;
    let retry_after = header(&limited, "retry-after").unwrap();
    assert!(retry_after.ends_with(" 00:00:00 GMT"), "{retry_after}");
    sandbox.configure(|cfg| cfg.daily_retry_after = None);
    let limited = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(header(&limited, "retry-after"), None);

    // A per-account daily cap applies whatever the plan.
    let capped = edit_body("pro-capped", "hi");
    assert_eq!(
        edit(&sandbox, &client, &token, "m2", &capped)
            .await
            .status(),
        200
    );
    assert_eq!(
        edit(&sandbox, &client, &token, "m2", &capped)
            .await
            .status(),
        429
    );

    let stats = sandbox.stats();
    let free = &stats.accounts["free"];
    assert_eq!(
        (free.daily_limit, free.daily_used, free.rate_limited_daily),
        (Some(3), 3, 3)
    );
    assert_eq!(stats.accounts["pro-capped"].rate_limited_daily, 1);
}

#[tokio::test]
async fn scripted_steps_are_consumed_in_order() {
    let sandbox = start(SandboxConfig::default()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("acct", "hi");
    sandbox.script(
        "m1",
        vec![
            Scripted::status(503),
            Scripted::too_many_requests(Some("2020-05-31T00:00:00Z")),
            Scripted::Reset,
            Scripted::Status {
                status: 200,
                headers: vec![("X-Custom".to_string(), "yes".to_string())],
                body: Some(json!({"result": true})),
            },
            Scripted::Delay(Duration::from_millis(100)),
            Scripted::Pass,
        ],
    );

    let response = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(body_of(response).await["code"], 503);

    let response = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        header(&response, "retry-after"),
        Some("2020-05-31T00:00:00Z")
    );

    let reset = client
        .put(message_url(&sandbox, "m1"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await;
    let error = reset.expect_err("a reset is a transport error");
    assert!(error.status().is_none(), "{error:?}");

    let response = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(header(&response, "x-custom"), Some("yes"));
    assert_eq!(body_of(response).await, json!({"result": true}));
    assert_eq!(
        sandbox.message("m1").unwrap().edits,
        0,
        "scripted answers edit nothing"
    );

    let began = Instant::now();
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );
    assert!(began.elapsed() >= Duration::from_millis(100));
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );
    assert_eq!(sandbox.message("m1").unwrap().edits, 2);

    let stats = sandbox.stats();
    assert_eq!(stats.resets, 1);
    assert_eq!(stats.requests_total, 6);
    assert_eq!(stats.by_status[&200], 3);
    let log = sandbox.requests();
    let statuses: Vec<Option<u16>> = log.iter().map(|r| r.status).collect();
    let expected = [Some(503), Some(429), None, Some(200), Some(200), Some(200)];
    assert_eq!(statuses, expected);
    assert!(log
        .iter()
        .all(|r| r.account_id.as_deref() == Some("acct") && r.message_id == "m1"));
    sandbox.clear_requests();
    assert!(sandbox.requests().is_empty());
}

#[tokio::test]
async fn random_faults_follow_the_configuration() {
    let sandbox = start(SandboxConfig::default()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("acct", "hi");

    sandbox.set_faults(Faults {
        reset: 1.0,
        ..Faults::default()
    });
    let error = client
        .put(message_url(&sandbox, "m1"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .expect_err("reset");
    assert!(error.status().is_none());

    sandbox.set_faults(Faults {
        error_5xx: 1.0,
        ..Faults::default()
    });
    for _ in 0..5 {
        let response = edit(&sandbox, &client, &token, "m1", &body).await;
        let status = response.status().as_u16();
        assert!([500, 502, 503].contains(&status), "{status}");
        assert_eq!(body_of(response).await["code"], status);
    }

    for (form, check) in [
        (
            RetryAfterForm::Seconds,
            (|v: &str| v == "3") as fn(&str) -> bool,
        ),
        (RetryAfterForm::HttpDate, |v: &str| {
            httpdate::parse_http_date(v).is_ok()
        }),
        (RetryAfterForm::Iso8601, |v: &str| {
            v.len() == 20 && v.ends_with('Z')
        }),
    ] {
        sandbox.set_faults(Faults {
            spurious_429: 1.0,
            spurious_429_retry_after: Some(form),
            spurious_429_delay: Duration::from_millis(2_500),
            ..Faults::default()
        });
        let response = edit(&sandbox, &client, &token, "m1", &body).await;
        assert_eq!(response.status(), 429);
        assert_eq!(header(&response, "x-ratelimit-type"), Some("QPS"));
        let retry_after = header(&response, "retry-after").unwrap();
        assert!(check(retry_after), "{form:?}: {retry_after}");
    }
    sandbox.set_faults(Faults {
        spurious_429: 1.0,
        spurious_429_retry_after: None,
        ..Faults::default()
    });
    let bare = edit(&sandbox, &client, &token, "m1", &body).await;
    assert_eq!(bare.status(), 429);
    assert!(header(&bare, "retry-after").is_none() && header(&bare, "x-ratelimit-type").is_none());

    sandbox.set_faults(Faults {
        slow: 1.0,
        slow_min: Duration::from_millis(100),
        slow_max: Duration::from_millis(150),
        ..Faults::default()
    });
    let began = Instant::now();
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );
    assert!(began.elapsed() >= Duration::from_millis(100));

    sandbox.set_faults(Faults::default());
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );
    assert_eq!(sandbox.faults(), Faults::default());
    let account = sandbox.account("acct").unwrap();
    assert_eq!(account.rate_limited, 4);
    assert_eq!(
        account.rate_limited_qps, 0,
        "spurious 429s are not quota 429s"
    );
}

/// Statuses (`None` for a reset) of `n` sequential edits against a fresh sandbox.
async fn fault_campaign(seed: u64, n: usize) -> Vec<Option<u16>> {
    let cfg = SandboxConfig {
        seed,
        default_plan: Plan::Business,
        faults: Faults {
            error_5xx: 0.3,
            reset: 0.1,
            spurious_429: 0.2,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    };
    let sandbox = start(cfg).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let body = edit_body("acct", "hi");
    for _ in 0..n {
        let _ = client
            .put(message_url(&sandbox, "m1"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await;
    }
    sandbox.requests().iter().map(|r| r.status).collect()
}

#[tokio::test]
async fn faults_replay_for_the_same_seed() {
    let first = fault_campaign(7, 30).await;
    assert_eq!(first, fault_campaign(7, 30).await);
    assert_ne!(first, fault_campaign(8, 30).await);
    assert!(first.contains(&Some(200)) && first.iter().any(|s| *s != Some(200)));
}

#[tokio::test]
async fn concurrency_high_water_marks() {
    let sandbox = start(SandboxConfig {
        token_delay: Duration::from_millis(150),
        ..SandboxConfig::default()
    })
    .await;
    let client = client();

    // Three overlapping token requests, then one alone.
    let tokens = futures_util::future::join_all((0..3).map(|_| token(&sandbox, &client))).await;
    assert_eq!(sandbox.stats().token_max_concurrent, 3);
    assert_eq!(sandbox.stats().token_requests, 3);

    // Overlapping edits of one message, held in flight by scripted delays.
    let overlapped = edit_body("acct", "overlap");
    let delay = Scripted::Delay(Duration::from_millis(150));
    sandbox.script("hot", vec![delay.clone(), delay.clone(), delay]);
    let edits = tokens
        .iter()
        .map(|token| edit(&sandbox, &client, token, "hot", &overlapped));
    let responses = futures_util::future::join_all(edits).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(sandbox.message("hot").unwrap().max_concurrent, 3);

    // Sequential edits never overlap.
    for _ in 0..3 {
        let _ = edit(&sandbox, &client, &tokens[0], "calm", &overlapped).await;
    }
    assert_eq!(sandbox.message("calm").unwrap().max_concurrent, 1);
    assert_eq!(sandbox.message("calm").unwrap().requests, 3);
}

#[tokio::test]
async fn http_views_for_bot_authors() {
    let sandbox = start(SandboxConfig::default()).await;
    let client = client();
    let token = token(&sandbox, &client).await;
    let base = format!("http://{}", sandbox.addr());

    let unseen = client
        .get(format!("{base}/sandbox/messages/m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(unseen.status(), 404);

    let body = edit_body("acct", "hello");
    assert_eq!(
        edit(&sandbox, &client, &token, "m1", &body).await.status(),
        200
    );
    let seen = client
        .get(format!("{base}/sandbox/messages/m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    let seen = body_of(seen).await;
    assert_eq!(seen["content"], body["content"]);
    assert_eq!(seen["edits"], 1);

    let stats = client
        .get(format!("{base}/sandbox/stats"))
        .send()
        .await
        .unwrap();
    let stats = body_of(stats).await;
    assert_eq!(stats["requests_total"], 1);
    assert_eq!(stats["by_status"]["200"], 1);
    assert_eq!(stats["token_requests"], 1);
    assert_eq!(stats["accounts"]["acct"]["successes"], 1);
    assert_eq!(stats["accounts"]["acct"]["limit_per_second"], 20);

    let nowhere = client
        .get(format!("{base}/v2/users/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
}

#[test]
fn window_maxima_from_the_arrival_log() {
    let millis = |ms: &[u64]| ms.iter().map(|&m| Duration::from_millis(m)).collect();
    let stats = AccountStats {
        plan: Plan::Pro,
        limit_per_second: 20,
        capacity_per_second: 20,
        daily_limit: None,
        requests: 7,
        successes: 7,
        rate_limited: 0,
        rate_limited_qps: 0,
        rate_limited_daily: 0,
        daily_used: 0,
        max_fixed_window: 0,
        max_sliding_window: 0,
        // Four in window 0, three of them at its end, then two early in window 1.
        arrivals: millis(&[100, 900, 950, 990, 1_010, 1_050, 2_000]),
    };
    assert_eq!(stats.max_in_fixed_window(Duration::from_secs(1)), 4);
    assert_eq!(stats.max_in_sliding_window(Duration::from_secs(1)), 6);
    assert_eq!(stats.max_in_sliding_window(Duration::from_millis(100)), 3);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sandbox = start(SandboxConfig::default()).await;
    let url = sandbox.token_url();
    sandbox.shutdown().await;
    let error = client()
        .post(url)
        .send()
        .await
        .expect_err("nothing listens");
    assert!(error.is_connect(), "{error:?}");
}
