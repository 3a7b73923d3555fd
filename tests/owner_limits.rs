//! The limit of live streams per owner, through real servers. Two instances
//! sharing one Redis (or a Redis Cluster) answer 429 with `Retry-After`.
//! Streams that end, or whose process died, stop counting, and the owner's
//! set is refreshed with a TTL.

mod cluster_support;
mod common;
mod support;

use std::time::Duration;

use common::{TestServer, contains, eventually, read_until, redis, unique_prefix};
use http::HeaderName;
use redis::aio::ConnectionLike;
use sse_resilience::SseResilienceLayer;
use support::stream_key;

const TOKEN: &str = "data: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "id: 9\nevent: completed\ndata: {\"type\":\"completed\"}\n\n";

fn limited_layer<C>(conn: C, prefix: &str, max: usize) -> SseResilienceLayer
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    SseResilienceLayer::new(conn)
        .key_prefix(prefix)
        .without_heartbeats()
        .owner_header(HeaderName::from_static("x-user-id"))
        .max_streams_per_owner(max)
        .owner_limit_retry(Duration::from_secs(3))
}

fn owner_key(prefix: &str, owner: &str) -> String {
    format!("{prefix}owner:{{{owner}}}")
}

async fn get_as(server: &TestServer, path: &str, owner: &str) -> reqwest::Response {
    server
        .client
        .get(server.url(path))
        .header("x-user-id", owner)
        .send()
        .await
        .unwrap()
}

/// Opens stream `id` as `owner`, sends one event and reads it on the client.
async fn open_as(
    server: &TestServer,
    id: &str,
    owner: &str,
) -> (reqwest::Response, common::ScriptedStream) {
    let mut response = get_as(server, &format!("/sse?stream_id={id}"), owner).await;
    assert_eq!(response.status(), 200, "opening stream {id} as {owner}");
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    (response, stream)
}

async fn members<C: ConnectionLike>(conn: &mut C, key: &str) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

async fn pttl<C: ConnectionLike>(conn: &mut C, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

async fn hash_exists<C: ConnectionLike>(conn: &mut C, prefix: &str, id: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(stream_key(prefix, id))
        .query_async::<i64>(conn)
        .await
        .unwrap()
        == 1
}

/// Two instances on `conn` with a limit of two streams per owner.
async fn limit_holds_across_instances<C>(conn: C, prefix: &str)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let a = TestServer::start(limited_layer(conn.clone(), prefix, 2)).await;
    let b = TestServer::start(limited_layer(conn.clone(), prefix, 2)).await;
    let mut redis = conn.clone();
    let alice = owner_key(prefix, "alice");

    let (mut first, first_stream) = open_as(&a, "o1", "alice").await;
    let (_second, _second_stream) = open_as(&b, "o2", "alice").await;

    let rejected = get_as(&a, "/sse?stream_id=o3", "alice").await;
    assert_eq!(rejected.status(), 429);
    assert_eq!(rejected.headers()["retry-after"], "3");
    assert_eq!(
        a.scripted.calls(),
        1,
        "the inner service ran for the rejected stream"
    );
    assert!(
        !hash_exists(&mut redis, prefix, "o3").await,
        "the rejected stream kept its claim"
    );
    let mut counted = members(&mut redis, &alice).await;
    counted.sort();
    assert_eq!(counted, ["o1", "o2"]);

    // Other owners, and requests without an owner, are not affected.
    let (_bob, _bob_stream) = open_as(&b, "o4", "bob").await;
    let (_anonymous, _anonymous_stream) = open_as(&a, "o5", "").await;
    assert!(pttl(&mut redis, &owner_key(prefix, "")).await == -2);

    // A stream that ends frees its place at once.
    first_stream.send(COMPLETED);
    read_until(&mut first, |bytes| contains(bytes, COMPLETED.as_bytes())).await;
    eventually("the ended stream leaves the owner's set", || {
        let mut redis = redis.clone();
        let alice = alice.clone();
        async move { members(&mut redis, &alice).await == ["o2"] }
    })
    .await;
    let (_third, _third_stream) = open_as(&b, "o6", "alice").await;

    // At the limit again, a replay of a finished stream is still served.
    let replay = get_as(&a, "/sse?stream_id=o1", "alice").await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.bytes().await.unwrap(), COMPLETED.as_bytes());
    let rejected = get_as(&b, "/sse?stream_id=o7", "alice").await;
    assert_eq!(rejected.status(), 429);
}

#[tokio::test]
async fn limit_holds_across_instances_on_one_redis() {
    let prefix = unique_prefix("owner_limit");
    limit_holds_across_instances(redis().await, &prefix).await;
}

#[tokio::test]
async fn limit_holds_across_instances_on_cluster() {
    let cluster = tokio::task::spawn_blocking(cluster_support::shared_cluster)
        .await
        .unwrap();
    let prefix = unique_prefix("owner_limit_cluster");
    limit_holds_across_instances(cluster.connect().await, &prefix).await;
}

#[tokio::test]
async fn owner_set_refreshed_with_ttl() {
    let prefix = unique_prefix("owner_refresh");
    let layer =
        limited_layer(redis().await, &prefix, 3).stale_threshold(Duration::from_millis(600));
    let server = TestServer::start(layer).await;
    let (_response, _stream) = open_as(&server, "r1", "carol").await;

    let mut conn = redis().await;
    let key = owner_key(&prefix, "carol");
    let score = |conn: &mut redis::aio::ConnectionManager| {
        let key = key.clone();
        let mut conn = conn.clone();
        async move {
            redis::cmd("ZSCORE")
                .arg(&key)
                .arg("r1")
                .query_async::<Option<f64>>(&mut conn)
                .await
                .unwrap()
        }
    };
    let first = score(&mut conn).await.expect("the stream is counted");
    let ttl = pttl(&mut conn, &key).await;
    assert!(ttl > 0, "owner set TTL {ttl} ms");
    assert!(ttl <= 6_000, "owner set TTL {ttl} ms");

    eventually("a refresh re-scores the owner's stream", || {
        let next = score(&mut conn);
        async move { next.await.is_some_and(|next| next > first) }
    })
    .await;
}

/// A stream whose process died keeps its place only until it is stale.
#[tokio::test]
async fn dead_instance_streams_expire() {
    let prefix = unique_prefix("owner_dead");
    let stale = Duration::from_millis(900);

    let crashed_prefix = prefix.clone();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let layer = limited_layer(redis().await, &crashed_prefix, 1).stale_threshold(stale);
            let server = TestServer::start(layer).await;
            let (response, stream) = open_as(&server, "d1", "dave").await;
            // Leave everything open when the runtime stops, as a crash would.
            std::mem::forget((server, response, stream));
        });
        runtime.shutdown_background();
    })
    .await
    .unwrap();

    let server =
        TestServer::start(limited_layer(redis().await, &prefix, 1).stale_threshold(stale)).await;
    let rejected = get_as(&server, "/sse?stream_id=d2", "dave").await;
    assert_eq!(
        rejected.status(),
        429,
        "the dead instance's stream still counts"
    );

    let mut opened = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = get_as(&server, "/sse?stream_id=d2", "dave").await;
        if response.status() == 200 {
            opened = Some(response);
            break;
        }
        assert_eq!(response.status(), 429);
    }
    assert!(
        opened.is_some(),
        "the dead instance's stream never stopped counting"
    );
    let mut conn = redis().await;
    assert_eq!(
        members(&mut conn, &owner_key(&prefix, "dave")).await,
        ["d2"]
    );
}

#[tokio::test]
#[should_panic(expected = "invalid max_streams_per_owner")]
async fn zero_owner_limit_rejected() {
    let _ = SseResilienceLayer::new(redis().await).max_streams_per_owner(0);
}
