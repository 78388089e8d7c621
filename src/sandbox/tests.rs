//! Injected 429s ([`Sandbox::inject_429`]) over real HTTP: they answer exactly the requests
//! asked for, whichever of the three calls they are, name the limit and carry the
//! `Retry-After` asked for, and count like any request.

use std::time::Duration;

use serde_json::json;

use super::{Injected429, InjectedLimit, Sandbox, SandboxConfig};

async fn edit(sandbox: &Sandbox, client: &reqwest::Client, token: &str) -> reqwest::Response {
    let body = json!({
        "robot_jid": "bot@xmpp.zoom.us", "account_id": "acct",
        "content": {"head": {"text": "hi"}},
    });
    client
        .put(format!("{}/im/chat/messages/m1", sandbox.api_base()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("edit request")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn injected_429s_answer_the_next_requests_of_the_account() {
    let sandbox = Sandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox starts");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token: serde_json::Value = client
        .post(format!(
            "{}?grant_type=client_credentials",
            sandbox.token_url()
        ))
        .basic_auth("sandbox-client", Some("sandbox-secret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();

    let qps = Injected429 {
        limit: InjectedLimit::Qps,
        retry_after: None,
    };
    let daily = Injected429 {
        limit: InjectedLimit::Daily,
        retry_after: Some(Duration::from_millis(4_500)),
    };
    sandbox.inject_429("acct", qps, 1);
    sandbox.inject_429("acct", daily, 1);

    let first = edit(&sandbox, &client, &token).await;
    assert_eq!(first.status(), 429);
    assert_eq!(header(&first, "x-ratelimit-type"), Some("QPS"));
    assert_eq!(header(&first, "retry-after"), None);
    let second = edit(&sandbox, &client, &token).await;
    assert_eq!(second.status(), 429);
    assert_eq!(header(&second, "x-ratelimit-type"), Some("Daily-limit"));
    assert_eq!(header(&second, "retry-after"), Some("5"));
    assert_eq!(edit(&sandbox, &client, &token).await.status(), 200);

    let account = sandbox.account("acct").unwrap();
    assert_eq!(
        account.requests, 3,
        "injected 429s count toward the windows"
    );
    assert_eq!((account.rate_limited, account.successes), (2, 1));
    assert_eq!(
        (account.rate_limited_qps, account.rate_limited_daily),
        (0, 0),
        "neither limit was reached"
    );
    assert_eq!(account.daily_used, 3);
}

/// The injections are the account's, not the edit call's: Zoom's quota is shared by send, edit
/// and delete, and so is whatever refuses a request of it.
#[tokio::test]
async fn injected_429s_answer_sends_and_deletes_too() {
    let sandbox = Sandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox starts");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token: serde_json::Value = client
        .post(format!(
            "{}?grant_type=client_credentials",
            sandbox.token_url()
        ))
        .basic_auth("sandbox-client", Some("sandbox-secret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    let qps = Injected429 {
        limit: InjectedLimit::Qps,
        retry_after: None,
    };
    sandbox.inject_429("acct", qps, 2);

    let body = json!({
        "robot_jid": "bot@xmpp.zoom.us", "to_jid": "chan@conference.xmpp.zoom.us",
        "account_id": "acct", "content": {"head": {"text": "hi"}},
    });
    let send = || {
        client
            .post(format!("{}/im/chat/messages", sandbox.api_base()))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let delete = client
        .delete(format!(
            "{}/im/chat/messages/m1?account_id=acct&robot_jid=bot%40xmpp.zoom.us",
            sandbox.api_base()
        ))
        .bearer_auth(&token)
        .send();
    assert_eq!(send().await.unwrap().status(), 429);
    assert_eq!(delete.await.unwrap().status(), 429);
    assert_eq!(send().await.unwrap().status(), 201);

    assert_eq!(
        sandbox.messages().len(),
        2,
        "m1, not deleted, and the sent one"
    );
    assert!(!sandbox.message("m1").unwrap().deleted);
    let account = sandbox.account("acct").unwrap();
    assert_eq!((account.rate_limited, account.successes), (2, 1));
}
