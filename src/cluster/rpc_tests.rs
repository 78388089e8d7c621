//! Forwarded calls against a real NATS server: a call in this daemon's format is run on the
//! owner's queue; one in another format is refused with the reason, never misread.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::rpc::{self, Answer, Call, CallError};
use crate::config::StorageConfig;
use crate::metrics::Metrics;
use crate::protocol::{parse_request, Request};
use crate::queue::LocalQueue;
use crate::testkit::nats::NatsCluster;

fn edit(message: &str, text: &str) -> Call {
    let line = format!(
        r#"{{"op":"edit","message_id":"{message}","account_id":"acct","robot_jid":"bot@xmpp.zoom.us","content":{{"head":{{"text":"{text}"}}}}}}"#
    );
    match parse_request(line.as_bytes()).unwrap() {
        Request::Edit(edit) => Call::Enqueue(edit),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_another_format_are_refused_with_the_reason() {
    let nats = NatsCluster::start(1).await.unwrap();
    let client = nats.client().await.unwrap();
    // What the start-up checks of max_payload rely on: known after one round trip.
    client.flush().await.unwrap();
    assert!(client.server_info().max_payload >= 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        path: dir.path().to_path_buf(),
        cache_capacity: 8 * 1024 * 1024,
        ..StorageConfig::default()
    };
    let (queue, _ready) = LocalQueue::open(&config, Arc::new(Metrics::new())).unwrap();
    let subject = rpc::subject("zqrpc", 7);
    let stop = CancellationToken::new();
    let server = tokio::spawn(rpc::serve(
        client.clone(),
        subject.clone(),
        queue.clone(),
        stop.clone(),
    ));
    // Serving starts with a subscription: wait until a call is answered.
    let answer = loop {
        match rpc::call(
            &client,
            subject.clone(),
            &edit("m1", "one"),
            Duration::from_secs(2),
        )
        .await
        {
            Err(CallError::NoOwner) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other,
        }
    };
    assert!(matches!(answer, Ok(Answer::Enqueued(Ok(_)))), "{answer:?}");
    assert_eq!(queue.stats().pending, 1);

    // A call as a daemon of another format (here: none) sends it: refused, not run.
    let payload = serde_json::to_vec(&edit("m2", "two")).unwrap();
    let refusal = client
        .request(subject.clone(), payload.into())
        .await
        .unwrap();
    let why = refusal
        .headers
        .as_ref()
        .and_then(|h| h.get("Zoomq-Rpc-Refused"))
        .map(|v| v.as_str().to_string())
        .expect("a refusal");
    assert!(
        why.contains("forwarding format 1") && why.contains("format 0"),
        "{why}"
    );
    assert!(refusal.payload.is_empty());
    assert_eq!(queue.stats().pending, 1, "the refused call changed nothing");

    // And the other way: an owner of another format refuses; the caller passes its reason on.
    let other = rpc::subject("zqrpc", 8);
    let mut subscription = client.subscribe(other.clone()).await.unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        if let Some(message) = subscription.next().await {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Zoomq-Rpc-Refused", "reads forwarding format 2");
            responder
                .publish_with_headers(message.reply.unwrap(), headers, bytes::Bytes::new())
                .await
                .unwrap();
        }
    });
    client.flush().await.unwrap();
    match rpc::call(&client, other, &edit("m3", "three"), Duration::from_secs(2)).await {
        Err(CallError::Failed(why)) => assert_eq!(why, "reads forwarding format 2"),
        other => panic!("{other:?}"),
    }

    stop.cancel();
    server.await.unwrap();
    tokio::task::spawn_blocking(move || queue.close())
        .await
        .unwrap();
}
