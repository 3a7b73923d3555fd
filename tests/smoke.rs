mod common;

use common::*;
use sse_resilience::SseResilienceLayer;

#[tokio::test]
async fn terminal_event_replayed_without_inner_call() {
    let prefix = unique_prefix("smoke_replay");
    let server =
        TestServer::start(SseResilienceLayer::new(redis().await).key_prefix(&prefix)).await;

    let first = server
        .get("/fixed?stream_id=s1")
        .await
        .text()
        .await
        .unwrap();
    assert!(first.contains("event: completed"));
    let mut conn = redis().await;
    eventually("completion recorded", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            stream_field(&mut conn, &prefix, "s1", "state")
                .await
                .as_deref()
                == Some("completed")
        }
    })
    .await;

    let replay = server.get("/fixed?stream_id=s1").await;
    assert_eq!(replay.status(), 200);
    let body = replay.text().await.unwrap();
    assert_eq!(
        body,
        "id: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n"
    );
    assert_eq!(server.scripted.calls(), 1);
    let _ = keys_under(&mut conn, &prefix).await;
}
