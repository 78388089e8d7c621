//! Delivery to the sandbox over real HTTP: each class of Zoom answer, the token, rate limits
//! and pauses, per-message serialization, dead letters and shutdown.

use std::time::{Duration, Instant};

use serde_json::json;
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, Faults, SandboxConfig, Scripted};

use crate::helpers::{edit, sandbox, shown, TestDaemon, Tweaks};

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn delivers_and_classifies_every_answer() {
    let zoom = sandbox(SandboxConfig::default()).await;
    zoom.script("ok-204", vec![Scripted::status(204)]);
    zoom.script(
        "flaky-503",
        vec![Scripted::status(503), Scripted::status(502)],
    );
    zoom.script("flaky-408", vec![Scripted::status(408)]);
    zoom.script("flaky-reset", vec![Scripted::Reset]);
    zoom.script(
        "bad-400",
        vec![Scripted::Status {
            status: 400,
            headers: vec![],
            body: Some(json!({"code": 7001, "message": "Invalid request body."})),
        }],
    );
    zoom.script(
        "denied-403",
        vec![Scripted::Status {
            status: 403,
            headers: vec![],
            body: Some(json!({"code": 7004, "message": "Not authorized."})),
        }],
    );
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    for id in [
        "ok-200",
        "ok-204",
        "flaky-503",
        "flaky-408",
        "flaky-reset",
        "bad-400",
        "denied-403",
        "missing-404",
    ] {
        assert_eq!(client.call(&edit(id, "acct", id)).await["ok"], true);
    }
    let stats = daemon.drained(Duration::from_secs(20)).await;
    for id in ["ok-200", "flaky-503", "flaky-408", "flaky-reset"] {
        assert_eq!(shown(&zoom, id).as_deref(), Some(id), "{id} not delivered");
    }
    assert_eq!(stats["dead"], 3, "{stats}");
    assert!(stats["retries"].as_u64().unwrap() >= 4, "{stats}");
    let dead = client.call(&json!({"op": "dead_list"})).await;
    let mut by_message: Vec<(String, u64, i64)> = dead["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["reason"], "rejected");
            (
                d["message_id"].as_str().unwrap().to_string(),
                d["status"].as_u64().unwrap(),
                d["zoom_code"].as_i64().unwrap(),
            )
        })
        .collect();
    by_message.sort();
    assert_eq!(
        by_message,
        vec![
            ("bad-400".into(), 400, 7001),
            ("denied-403".into(), 403, 7004),
            ("missing-404".into(), 404, 8001)
        ]
    );
}

#[tokio::test]
async fn token_is_cached_single_flight_and_refreshed_after_401() {
    let zoom = sandbox(SandboxConfig::default()).await;
    zoom.set_token_delay(Duration::from_millis(300));
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    for i in 0..40 {
        client
            .call(&edit(&format!("t{i}"), &format!("acct{}", i % 4), "x"))
            .await;
    }
    daemon.drained(Duration::from_secs(20)).await;
    let stats = zoom.stats();
    assert_eq!(stats.token_requests, 1, "one token for everything");
    assert_eq!(stats.token_max_concurrent, 1);
    // Zoom invalidates the token: the next edit gets a 401, fetches a new one, and succeeds.
    zoom.expire_tokens();
    client.call(&edit("after-expiry", "acct0", "fresh")).await;
    daemon.drained(Duration::from_secs(20)).await;
    assert_eq!(shown(&zoom, "after-expiry").as_deref(), Some("fresh"));
    let stats = zoom.stats();
    assert_eq!(stats.token_requests, 2);
    assert_eq!(stats.token_max_concurrent, 1);
    assert_eq!(daemon.stats().await["dead"], 0);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_ahead_of_expiry() {
    let zoom = sandbox(SandboxConfig {
        token_ttl: Duration::from_secs(2),
        ..SandboxConfig::default()
    })
    .await;
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        client.call(&edit(&format!("r{i}"), "acct", "x")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.drained(Duration::from_secs(20)).await;
    let stats = zoom.stats();
    assert!(stats.token_requests >= 2, "token was refreshed: {stats:?}");
    assert_eq!(
        stats.by_status.get(&401),
        None,
        "refreshed before expiry, never a 401"
    );
}

#[tokio::test]
async fn bad_credentials_hold_edits_and_say_so() {
    let zoom = sandbox(SandboxConfig {
        client_secret: "the-real-secret".into(),
        ..SandboxConfig::default()
    })
    .await;
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    client.call(&edit("held", "acct", "waiting")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = daemon.stats().await;
        if stats["token_error"].is_string() {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "no token error reported: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = stats["token_error"].as_str().unwrap();
    assert!(
        error.contains("invalid_client") || error.contains("Invalid client"),
        "{error}"
    );
    assert!(
        !error.contains("sandbox-secret"),
        "the secret leaked: {error}"
    );
    assert_eq!(
        stats["pending"].as_u64().unwrap() + stats["in_flight"].as_u64().unwrap(),
        1
    );
    assert_eq!(stats["dead"], 0);
    assert!(
        !daemon.log().contains("sandbox-secret"),
        "secret in the log"
    );
    // Fix the credentials at "Zoom": the held edit goes out.
    zoom.configure(|c| c.client_secret = "sandbox-secret".into());
    daemon.drained(Duration::from_secs(90)).await;
    assert_eq!(shown(&zoom, "held").as_deref(), Some("waiting"));
    assert!(daemon.stats().await["token_error"].is_null());
}

/// The pacing rule itself (never more than the limit in any window, at the pacer's send times)
/// is pinned on a controlled clock in `limiter/tests/pacing.rs`. Here it goes through the real
/// daemon, HTTP and the sandbox, which sees requests later than they were sent by however long
/// this (debug, loaded, two-core) machine takes to run the request task: tens of milliseconds
/// at times, and more while the cluster tests' NATS servers and daemons run beside it. The
/// default margin leaves 5 ms per second for that, so this test gives the same rule a margin of
/// about 110 ms (20 requests at 18/s) and checks what arrives.
#[tokio::test]
async fn pacing_never_exceeds_the_plan_limit_in_any_second() {
    let zoom = sandbox(SandboxConfig::default()).await; // Pro: 20/s
    let tweaks = Tweaks::default().set("delivery", "rate_margin", "0.9");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    let mut client = daemon.client().await;
    for i in 0..70 {
        client.call(&edit(&format!("p{i}"), "pro-acct", "x")).await;
    }
    daemon.drained(Duration::from_secs(30)).await;
    let account = zoom.account("pro-acct").unwrap();
    assert_eq!(account.rate_limited, 0, "{account:?}");
    let sliding = account.max_in_sliding_window(Duration::from_secs(1));
    let fixed = account.max_in_fixed_window(Duration::from_secs(1));
    assert!(
        sliding <= 20 && fixed <= 20,
        "sliding {sliding}, fixed {fixed}"
    );
    assert_eq!(account.successes, 70);
}

#[tokio::test]
async fn retry_after_pauses_the_account_in_all_three_forms() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let in_two_seconds = std::time::SystemTime::now() + Duration::from_secs(2);
    let http_date = httpdate::fmt_http_date(in_two_seconds + Duration::from_secs(1));
    let iso = time::OffsetDateTime::from(in_two_seconds + Duration::from_secs(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    zoom.script("ra-seconds", vec![Scripted::too_many_requests(Some("1"))]);
    zoom.script(
        "ra-date",
        vec![Scripted::too_many_requests(Some(&http_date))],
    );
    zoom.script("ra-iso", vec![Scripted::too_many_requests(Some(&iso))]);
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    for (message, account) in [
        ("ra-seconds", "acct-s"),
        ("ra-date", "acct-d"),
        ("ra-iso", "acct-i"),
    ] {
        client.call(&edit(message, account, "v")).await;
    }
    daemon.drained(Duration::from_secs(20)).await;
    let requests = zoom.requests();
    for (message, min_gap) in [("ra-seconds", 0.9), ("ra-date", 1.0), ("ra-iso", 1.0)] {
        let times: Vec<_> = requests
            .iter()
            .filter(|r| r.message_id == message)
            .map(|r| r.at)
            .collect();
        assert_eq!(times.len(), 2, "{message}: one 429 then one success");
        let gap = (times[1] - times[0]).as_secs_f64();
        assert!(
            gap >= min_gap,
            "{message}: retried after {gap:.2}s, before Retry-After"
        );
        assert_eq!(shown(&zoom, message).as_deref(), Some("v"));
    }
    let stats = daemon.stats().await;
    assert_eq!(stats["dead"], 0, "a 429 never dead-letters");
    assert_eq!(stats["retries"], 0, "a 429 is not a failed attempt");
}

#[tokio::test]
async fn a_daily_limit_pauses_one_account_while_others_keep_their_rate() {
    let mut accounts = std::collections::HashMap::new();
    accounts.insert(
        "free-acct".to_string(),
        AccountSettings {
            plan: Some(Plan::Free),
            daily_limit: Some(3),
            ..AccountSettings::default()
        },
    );
    let zoom = sandbox(SandboxConfig {
        accounts,
        ..SandboxConfig::default()
    })
    .await;
    let tweaks = Tweaks::default().set("accounts.\"free-acct\"", "plan", "\"free\"");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    let mut client = daemon.client().await;
    for i in 0..6 {
        client
            .call(&edit(&format!("free-{i}"), "free-acct", "x"))
            .await;
    }
    for i in 0..40 {
        client
            .call(&edit(&format!("pro-{i}"), "pro-acct", "x"))
            .await;
    }
    let started = Instant::now();
    wait_for("pro account drained", Duration::from_secs(10), || {
        zoom.account("pro-acct").is_some_and(|a| a.successes == 40)
    })
    .await;
    // 40 edits at ~19.4/s: about two seconds, not held back by the paused account.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let free = zoom.account("free-acct").unwrap();
    assert_eq!(free.successes, 3);
    assert_eq!(
        free.rate_limited_daily, 1,
        "one 429, then the account is held: {free:?}"
    );
    // The limiter gauges are refreshed once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let stats = daemon.stats().await;
        if stats["accounts_paused"] == 1 || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["pending"], 3, "held, not dropped: {stats}");
    assert_eq!(stats["dead"], 0);
    assert_eq!(stats["accounts_paused"], 1, "{stats}");
}

#[tokio::test]
async fn one_request_per_message_and_only_the_latest_edit_wins() {
    let zoom = sandbox(SandboxConfig {
        faults: Faults {
            error_5xx: 0.3,
            slow: 0.3,
            slow_min: Duration::from_millis(20),
            slow_max: Duration::from_millis(80),
            ..Faults::default()
        },
        default_plan: Plan::Business,
        ..SandboxConfig::default()
    })
    .await;
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    // 5 hot messages, each edited 60 times as fast as the socket allows.
    for n in 0..60 {
        for m in 0..5 {
            client
                .call(&edit(&format!("hot-{m}"), "acct", &n.to_string()))
                .await;
        }
    }
    let stats = daemon.drained(Duration::from_secs(30)).await;
    for m in 0..5 {
        let record = zoom.message(&format!("hot-{m}")).unwrap();
        assert_eq!(shown(&zoom, &format!("hot-{m}")).as_deref(), Some("59"));
        assert_eq!(record.max_concurrent, 1, "two requests at once for hot-{m}");
    }
    assert!(stats["coalesced"].as_u64().unwrap() > 0);
    assert_eq!(stats["dead"], 0);
}

#[tokio::test]
async fn an_edit_waiting_for_a_retry_is_superseded_by_a_newer_one() {
    let zoom = sandbox(SandboxConfig::default()).await;
    zoom.script("sup", vec![Scripted::status(503)]);
    let tweaks = Tweaks::default()
        .set("delivery", "retry_initial", "\"1s\"")
        .set("delivery", "retry_max", "\"1s\"");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    let mut client = daemon.client().await;
    client.call(&edit("sup", "acct", "old")).await;
    wait_for("the 503", Duration::from_secs(5), || {
        zoom.message("sup").is_some_and(|m| m.requests == 1)
    })
    .await;
    // The sandbox counts the request before the daemon has read the 503: wait until the daemon
    // has put the edit back to wait for its retry.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.stats().await["in_flight"] != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The old edit now waits ~1 s for its retry; a newer edit replaces it.
    let answer = client.call(&edit("sup", "acct", "new")).await;
    assert_eq!(answer["coalesced"], true, "{answer}");
    daemon.drained(Duration::from_secs(10)).await;
    let record = zoom.message("sup").unwrap();
    assert_eq!(record.requests, 2, "old content never sent again");
    assert_eq!(shown(&zoom, "sup").as_deref(), Some("new"));
    assert!(daemon.stats().await["superseded"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn dead_letters_survive_restart_and_can_be_retried_or_purged() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let mut daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    client.call(&edit("missing-a", "acct", "x")).await;
    client.call(&edit("missing-b", "acct", "y")).await;
    let stats = daemon.drained(Duration::from_secs(10)).await;
    assert_eq!(stats["dead"], 2);
    assert_eq!(daemon.terminate().code(), Some(0));
    daemon.spawn().await;
    let mut client = daemon.client().await;
    let dead = client.call(&json!({"op": "dead_list"})).await;
    assert_eq!(dead["dead"].as_array().unwrap().len(), 2);
    let first = dead["dead"][0]["job_id"].as_str().unwrap().to_string();
    // Zoom now knows the message: retrying delivers it.
    zoom.configure(|c| c.missing_prefix = Some("gone-".into()));
    let retried = client
        .call(&json!({"op": "dead_retry", "job_id": first}))
        .await;
    assert_eq!(retried["retried"], 1, "{retried}");
    daemon.drained(Duration::from_secs(10)).await;
    let purged = client.call(&json!({"op": "dead_purge", "all": true})).await;
    assert_eq!(purged["purged"], 1);
    let stats = daemon.stats().await;
    assert_eq!(stats["dead"], 0);
    let unknown = client
        .call(&json!({"op": "dead_retry", "job_id": "999999"}))
        .await;
    assert_eq!(unknown["error"], "bad_request");
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_and_exits_zero() {
    let zoom = sandbox(SandboxConfig {
        faults: Faults {
            slow: 1.0,
            slow_min: Duration::from_millis(400),
            slow_max: Duration::from_millis(600),
            ..Faults::default()
        },
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    for i in 0..5 {
        client.call(&edit(&format!("s{i}"), "acct", "x")).await;
    }
    wait_for("requests in flight", Duration::from_secs(5), || {
        zoom.stats().requests_total > 0
    })
    .await;
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0));
    // What was in flight finished; the rest is still stored and goes out after a restart.
    zoom.set_faults(Faults::default());
    daemon.spawn().await;
    daemon.drained(Duration::from_secs(10)).await;
    for i in 0..5 {
        assert_eq!(shown(&zoom, &format!("s{i}")).as_deref(), Some("x"));
    }
}
