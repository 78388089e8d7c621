//! Per-account limits: the per-second windows, capacity overrides, the daily cap, and the
//! window arithmetic of the arrival log.

use std::time::Duration;

use serde_json::json;
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, AccountStats, RetryAfterForm, SandboxConfig};

use crate::{body_of, client, edit, edit_body, fresh_window, header, next_window, start, token};

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
