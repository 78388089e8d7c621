//! Integration tests of the local Zoom sandbox, over real HTTP on loopback with reqwest, one
//! module per concern: `token`, `edit`, `lifecycle` (send, edit and delete of one message and
//! the quota they share), `apply_faults` (faults before and after a request is applied, as a
//! client retrying sends meets them), `limits`, `faults`, `observe`. This file holds the
//! helpers they share.
//!
//! Each test starts its own sandbox on an ephemeral port. Tests that depend on the fixed
//! per-second windows first wait for a fresh window (see `fresh_window`), so they hold however
//! the scheduler delays them.

mod apply_faults;
mod edit;
mod faults;
mod lifecycle;
mod limits;
mod observe;
mod token;

use std::time::Duration;

use serde_json::{json, Value};
use zoomq::sandbox::{Sandbox, SandboxConfig};

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

fn send_body(account_id: &str, to_jid: &str, text: &str) -> Value {
    json!({
        "robot_jid": ROBOT,
        "to_jid": to_jid,
        "account_id": account_id,
        "content": {"head": {"text": "Build 42"}, "body": [{"type": "message", "text": text}]},
    })
}

async fn send(
    sandbox: &Sandbox,
    client: &reqwest::Client,
    token: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{}/im/chat/messages", sandbox.api_base()))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("send request")
}

/// A delete of `message_id` in `account_id` by the usual robot, as Zoom takes it: all in the
/// query, no body.
async fn delete(
    sandbox: &Sandbox,
    client: &reqwest::Client,
    token: &str,
    message_id: &str,
    account_id: &str,
) -> reqwest::Response {
    let query = format!("account_id={account_id}&robot_jid={ROBOT}");
    client
        .delete(format!("{}?{query}", message_url(sandbox, message_id)))
        .bearer_auth(token)
        .send()
        .await
        .expect("delete request")
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
