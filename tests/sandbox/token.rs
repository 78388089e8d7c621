//! The token endpoint: grant types, credentials, and when a token stops working.

use std::time::Duration;

use serde_json::json;
use zoomq::sandbox::SandboxConfig;

use crate::{body_of, client, edit, edit_body, start, token};

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
