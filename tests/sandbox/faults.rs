//! Scripted answers and random faults of edits, and their replay for a seed.

use std::time::{Duration, Instant};

use serde_json::json;
use zoomq::plan::Plan;
use zoomq::sandbox::{Faults, RetryAfterForm, SandboxConfig, Scripted};

use crate::{body_of, client, edit, edit_body, header, message_url, start, token};

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
