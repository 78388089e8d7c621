//! What the sandbox lets tests and bot authors observe: concurrency high-water marks, the
//! `/sandbox/*` views, and shutdown.

use std::time::Duration;

use zoomq::sandbox::{SandboxConfig, Scripted};

use crate::{body_of, client, edit, edit_body, start, token};

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
