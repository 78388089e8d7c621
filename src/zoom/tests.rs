//! Loopback tests of [`ZoomClient`] against the scripted fake Zoom of `fake.rs`, through edits:
//! one test per answer class, rate-limit headers, the token's caching, refresh, single flight,
//! 401 handling and backoff, and message-id encoding. Sends, deletes and `in_doubt` are in
//! `tests_lifecycle.rs`. No test sleeps longer than about 1 s.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::fake::{reply, rig, rig_with, EDIT_BODY, SECRET};
use super::*;

#[tokio::test]
async fn delivered_with_and_without_body() {
    let rig = rig().await;
    rig.fake
        .script([reply(200, r#"{"message_id":"msg-1"}"#), reply(204, "")]);
    assert_eq!(
        rig.edit().await,
        Outcome::Delivered {
            status: 200,
            sent: None
        }
    );
    assert_eq!(
        rig.edit().await,
        Outcome::Delivered {
            status: 204,
            sent: None
        }
    );
    let seen = &rig.fake.calls()[0];
    assert_eq!(seen.path, "/v2/im/chat/messages/msg-1");
    assert_eq!(seen.headers["authorization"], "Bearer tok-1");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["accept"], "application/json");
    assert_eq!(
        seen.headers["user-agent"],
        concat!("zoomq/", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(seen.body.as_ref(), EDIT_BODY);
    assert_eq!(rig.responses("2xx"), 2);
    assert_eq!(rig.metrics.zoom_request_duration.get_sample_count(), 2);
    assert_eq!(rig.metrics.token_refreshes.get(), 1);
    assert_eq!(rig.metrics.token_valid.get(), 1);
}

#[tokio::test]
async fn client_errors_are_rejected_with_code_and_message() {
    let rig = rig().await;
    rig.fake.script([
        reply(400, r#"{"code":7001,"message":"Invalid request body."}"#),
        reply(
            403,
            r#"{"code":7003,"message":"No chatbot.","result":false}"#,
        ),
        reply(
            404,
            r#"{"code":8001,"message":"Invalid message_id value."}"#,
        ),
        reply(422, &format!("<html>{}</html>", "x".repeat(1000))),
    ]);
    let expected = [
        (400, 7001, "Invalid request body."),
        (403, 7003, "No chatbot."),
        (404, 8001, "Invalid message_id value."),
    ];
    for (status, code, message) in expected {
        assert_eq!(
            rig.edit().await,
            Outcome::Rejected {
                status,
                code: Some(code),
                message: message.into()
            }
        );
    }
    let Outcome::Rejected {
        status: 422,
        code: None,
        message,
    } = rig.edit().await
    else {
        panic!("422 is a rejection");
    };
    assert!(
        message.starts_with("<html>xxx") && message.chars().count() <= 201,
        "{message}"
    );
    assert_eq!(rig.responses("4xx"), 4);
}

#[tokio::test]
async fn server_errors_and_408_are_transient() {
    let rig = rig().await;
    rig.fake.script([
        reply(500, r#"{"code":500,"message":"Internal error"}"#),
        reply(503, "upstream unavailable"),
        reply(408, ""),
    ]);
    for (status, in_doubt) in [(500, true), (503, false), (408, false)] {
        let Outcome::Transient {
            status: Some(seen),
            detail,
            in_doubt: seen_in_doubt,
        } = rig.edit().await
        else {
            panic!("{status} is transient");
        };
        assert_eq!((seen, seen_in_doubt), (status, in_doubt));
        assert!(detail.contains(&status.to_string()), "{detail}");
    }
    assert_eq!(rig.responses("5xx"), 2);
    assert_eq!(rig.responses("4xx"), 1);
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let rig = rig_with(|settings| settings.api_base = format!("http://{dead}/v2")).await;
    let Outcome::Transient {
        status: None,
        detail,
        in_doubt: false,
    } = rig.edit().await
    else {
        panic!("a refused connection is transient, and was never applied");
    };
    assert!(detail.starts_with("cannot connect"), "{detail}");
    assert_eq!(rig.responses("network"), 1);
}

#[tokio::test]
async fn timeout_is_transient() {
    let rig = rig_with(|settings| settings.request_timeout = Duration::from_millis(300)).await;
    rig.edit().await; // Fetch the token outside the timed part.
    rig.fake
        .script([reply(200, "").after(Duration::from_secs(3))]);
    let started = std::time::Instant::now();
    let Outcome::Transient {
        status: None,
        detail,
        in_doubt: true,
    } = rig.edit().await
    else {
        panic!("a timeout is transient, and may have been applied");
    };
    assert!(detail.starts_with("timed out"), "{detail}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(rig.responses("network"), 1);
}

#[tokio::test]
async fn rate_limits_by_type_with_retry_after_in_every_form() {
    let rig = rig().await;
    let now = SystemTime::now();
    let in_an_hour = time::OffsetDateTime::from(now + Duration::from_secs(3600))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let body = r#"{"code":429,"message":"You have reached the maximum per-second rate limit for this API. Try again later."}"#;
    rig.fake.script([
        reply(429, body)
            .header("X-RateLimit-Type", "QPS")
            .header("X-RateLimit-Limit", "20")
            .header("Retry-After", "2"),
        reply(429, body)
            .header("X-RateLimit-Type", "Daily-limit")
            .header("Retry-After", &in_an_hour),
        reply(429, body).header(
            "Retry-After",
            &httpdate::fmt_http_date(now + Duration::from_secs(300)),
        ),
        reply(429, body),
    ]);
    let close_to = |at: Option<SystemTime>, expected: Duration| {
        let delay = at.expect("a Retry-After").duration_since(now).unwrap();
        assert!(
            delay.abs_diff(expected) < Duration::from_secs(3),
            "{delay:?} vs {expected:?}"
        );
    };
    let Outcome::RateLimited {
        kind: LimitKind::Qps,
        retry_after,
        limit: Some(20),
    } = rig.edit().await
    else {
        panic!("QPS 429");
    };
    close_to(retry_after, Duration::from_secs(2));
    let Outcome::RateLimited {
        kind: LimitKind::Daily,
        retry_after,
        limit: None,
    } = rig.edit().await
    else {
        panic!("daily 429");
    };
    close_to(retry_after, Duration::from_secs(3600));
    let Outcome::RateLimited {
        kind: LimitKind::Qps,
        retry_after,
        ..
    } = rig.edit().await
    else {
        panic!("429 without a type");
    };
    close_to(retry_after, Duration::from_secs(300));
    assert_eq!(
        rig.edit().await,
        Outcome::RateLimited {
            kind: LimitKind::Qps,
            retry_after: None,
            limit: None
        }
    );
}

#[tokio::test]
async fn token_is_cached_across_edits() {
    let rig = rig().await;
    for _ in 0..10 {
        assert_eq!(
            rig.edit().await,
            Outcome::Delivered {
                status: 200,
                sent: None
            }
        );
    }
    assert_eq!(rig.fake.token_requests(), 1);
    assert!(rig.fake.bearers().iter().all(|b| b == "Bearer tok-1"));
}

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    let rig = rig().await;
    // A 1 s token is refreshed at half its life.
    *rig.fake.token_lifetime.lock().unwrap() = Some(1);
    rig.edit().await;
    rig.edit().await;
    assert_eq!(rig.fake.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    rig.edit().await;
    assert_eq!(rig.fake.token_requests(), 2);
    assert_eq!(
        rig.fake.bearers(),
        ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
    );
}

#[tokio::test]
async fn failed_refresh_keeps_using_the_valid_token() {
    let rig = rig().await;
    *rig.fake.token_lifetime.lock().unwrap() = Some(1);
    rig.edit().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    rig.fake.script_tokens([reply(503, "maintenance")]);
    assert_eq!(
        rig.edit().await,
        Outcome::Delivered {
            status: 200,
            sent: None
        }
    );
    assert_eq!(rig.fake.token_requests(), 2);
    assert_eq!(rig.fake.bearers(), ["Bearer tok-1", "Bearer tok-1"]);
    assert!(rig.health.token_error().unwrap().contains("503"));
    assert_eq!(rig.metrics.token_valid.get(), 1);
}

#[tokio::test]
async fn token_requests_are_single_flight() {
    let rig = rig().await;
    *rig.fake.token_delay.lock().unwrap() = Duration::from_millis(300);
    let edits = (0..20).map(|i| {
        let client = rig.client.clone();
        tokio::spawn(async move { client.edit(&format!("msg-{i}"), EDIT_BODY).await })
    });
    for edit in edits.collect::<Vec<_>>() {
        assert_eq!(
            edit.await.unwrap(),
            Outcome::Delivered {
                status: 200,
                sent: None
            }
        );
    }
    assert_eq!(rig.fake.token_requests(), 1);
    assert_eq!(rig.fake.max_tokens_in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refused_token_is_replaced_once() {
    let rig = rig().await;
    rig.fake.script([
        reply(401, r#"{"code":124,"message":"Invalid access token."}"#),
        reply(200, ""),
        // A token code under another 4xx status means the same.
        reply(400, r#"{"code":7010,"message":"Invalid token."}"#),
        reply(204, ""),
    ]);
    assert_eq!(
        rig.edit().await,
        Outcome::Delivered {
            status: 200,
            sent: None
        }
    );
    assert_eq!(
        rig.edit().await,
        Outcome::Delivered {
            status: 204,
            sent: None
        }
    );
    assert_eq!(rig.fake.token_requests(), 3);
    assert_eq!(
        rig.fake.bearers(),
        [
            "Bearer tok-1",
            "Bearer tok-2",
            "Bearer tok-2",
            "Bearer tok-3"
        ]
    );
}

#[tokio::test]
async fn second_refusal_is_transient() {
    let rig = rig().await;
    rig.fake.script([
        reply(401, ""),
        reply(401, r#"{"code":124,"message":"Invalid access token."}"#),
    ]);
    let Outcome::Transient {
        status: Some(401),
        detail,
        in_doubt: false,
    } = rig.edit().await
    else {
        panic!("two 401s in a row are transient, and were never applied");
    };
    assert!(!detail.contains("tok-"), "{detail}");
    assert_eq!(rig.fake.token_requests(), 2);
    assert_eq!(rig.fake.calls().len(), 2);
}

#[tokio::test]
async fn late_refusal_keeps_a_newer_token() {
    let rig = rig().await;
    let tokens = &rig.client.inner.tokens;
    let first = tokens.get().await.unwrap();
    tokens.invalidate(first.generation);
    let second = tokens.get().await.unwrap();
    assert_ne!(first.generation, second.generation);
    // A 401 seen with the first token, arriving late, must not drop the second.
    tokens.invalidate(first.generation);
    assert_eq!(tokens.get().await.unwrap().generation, second.generation);
    assert_eq!(rig.fake.token_requests(), 2);
}

#[tokio::test]
async fn bad_credentials_give_no_token_and_back_off() {
    let rig = rig().await;
    let refusal = format!(
        r#"{{"reason":"Invalid client_id or client_secret {SECRET}","error":"invalid_client"}}"#
    );
    rig.fake
        .script_tokens([reply(401, &refusal), reply(400, &refusal)]);
    let Outcome::NoToken { detail } = rig.edit().await else {
        panic!("bad credentials give NoToken");
    };
    assert!(
        detail.contains("invalid_client") && !detail.contains(SECRET),
        "{detail}"
    );
    // During the backoff no request is made.
    assert!(matches!(rig.edit().await, Outcome::NoToken { .. }));
    assert_eq!(rig.fake.token_requests(), 1);
    assert!(rig.fake.calls().is_empty());
    let health = rig.health.token_error().expect("a health error");
    assert!(
        health.contains("invalid_client") && !health.contains(SECRET),
        "{health}"
    );
    assert_eq!(rig.metrics.token_failures.get(), 1);
    assert_eq!(rig.metrics.token_valid.get(), 0);
    assert!(!format!("{:?}", rig.client).contains(SECRET));

    // After the backoff (100 ms here) the next failure doubles it; then the endpoint recovers.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(rig.edit().await, Outcome::NoToken { .. }));
    assert_eq!(rig.fake.token_requests(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.edit().await,
        Outcome::Delivered {
            status: 200,
            sent: None
        }
    );
    assert_eq!(rig.fake.token_requests(), 3);
    assert_eq!(rig.health.token_error(), None);
    assert_eq!(rig.metrics.token_valid.get(), 1);
}

#[tokio::test]
async fn token_endpoint_down_gives_no_token() {
    let rig = rig().await;
    rig.fake.script_tokens([reply(502, "bad gateway")]);
    let Outcome::NoToken { detail } = rig.edit().await else {
        panic!("a failing token endpoint gives NoToken");
    };
    assert!(detail.contains("502"), "{detail}");
    assert!(rig.fake.calls().is_empty());
}

#[tokio::test]
async fn message_id_is_one_path_segment() {
    let rig = rig().await;
    assert_eq!(
        rig.client.edit("a/b c?d#e%f ü", EDIT_BODY).await,
        Outcome::Delivered {
            status: 200,
            sent: None
        }
    );
    assert_eq!(
        rig.fake.calls()[0].path,
        "/v2/im/chat/messages/a%2Fb%20c%3Fd%23e%25f%20%C3%BC"
    );
    for dots in ["", ".", ".."] {
        assert!(matches!(
            rig.client.edit(dots, EDIT_BODY).await,
            Outcome::Rejected { status: 0, .. }
        ));
    }
    assert_eq!(rig.fake.calls().len(), 1);
}

#[tokio::test]
async fn bad_urls_are_refused() {
    let settings = ZoomSettings {
        api_base: "ftp://example.com".into(),
        token_url: "https://zoom.us/oauth/token".into(),
        client_id: "id".into(),
        client_secret: Secret::new(SECRET),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
    };
    let error = ZoomClient::new(
        settings,
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    )
    .unwrap_err();
    assert!(error.to_string().contains("zoom.api_base"), "{error}");
}
