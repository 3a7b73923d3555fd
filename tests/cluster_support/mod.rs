//! A local Redis Cluster for the cluster tests: three masters with one replica
//! each, as redis-server child processes on free loopback ports, and helpers
//! that read keys, TTLs and command counters on its nodes.
//!
//! Needs `redis-server` 7.0 or later (for `--cluster-port`) and `redis-cli`.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use redis::{
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

/// Number of nodes: three masters and one replica of each.
const NODES: usize = 6;
/// Rounds of 20 ms to wait for a node or the cluster, about 20 s in all.
const WAIT_ROUNDS: usize = 1000;

/// A Redis Cluster of redis-server child processes. Dropping it kills the
/// processes and removes their folder. When the dropping thread is panicking,
/// the folder stays, and its path is printed for the node logs.
pub struct LocalCluster {
    children: Vec<Child>,
    /// Client ports of the nodes. The cluster bus uses other free ports.
    pub ports: Vec<u16>,
    dir: PathBuf,
}

impl LocalCluster {
    /// Starts six nodes, joins them into a cluster of three masters with one
    /// replica each, and waits until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sse-resilience-cluster-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("failed to create the cluster folder");

        // Client and bus ports are picked together so that no two are equal.
        // The bus ports are set explicitly because port + 10000 may exceed 65535.
        let ports = free_ports(2 * NODES);
        let (client_ports, bus_ports) = ports.split_at(NODES);
        let mut cluster = Self {
            children: Vec::new(),
            ports: client_ports.to_vec(),
            dir,
        };
        for (&port, &bus_port) in client_ports.iter().zip(bus_ports) {
            let child = cluster.spawn_node(port, bus_port);
            cluster.children.push(child);
        }
        for &port in &cluster.ports {
            wait_for_port(port);
        }
        cluster.create();
        cluster.wait_until_ready();
        cluster
    }

    fn spawn_node(&self, port: u16, bus_port: u16) -> Child {
        let log = File::create(self.dir.join(format!("redis-{port}.log")))
            .expect("failed to create a node log file");
        let config = self.dir.join(format!("nodes-{port}.conf"));
        Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &bus_port.to_string()])
            .arg("--cluster-config-file")
            .arg(&config)
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            // Nodes ping each other at least every half node timeout, so roles
            // spread faster than with the default of 15 s.
            .args(["--cluster-node-timeout", "3000"])
            .args(["--bind", "127.0.0.1", "--daemonize", "no"])
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start redis-server: is it installed and on PATH?")
    }

    fn create(&self) {
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("failed to run redis-cli: is it installed and on PATH?");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Waits until every node reports `cluster_state:ok` and
    /// `cluster_known_nodes:6`, and ROLE returns `master` on three nodes.
    fn wait_until_ready(&self) {
        let mut last = String::new();
        for _ in 0..WAIT_ROUNDS {
            match self.readiness() {
                Ok(()) => return,
                Err(reason) => last = reason,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the cluster on ports {:?} never became ready: {last}",
            self.ports
        );
    }

    fn readiness(&self) -> Result<(), String> {
        let mut masters = 0;
        for &port in &self.ports {
            let mut conn = sync_connection(port).map_err(|e| format!("node {port}: {e}"))?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut conn)
                .map_err(|e| format!("CLUSTER INFO on {port}: {e}"))?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("node {port} is not ok"));
            }
            if !info.contains(&format!("cluster_known_nodes:{NODES}\r\n")) {
                return Err(format!("node {port} does not know every node yet"));
            }

            if role(&mut conn)? == "master" {
                masters += 1;
            }
        }
        if masters == NODES / 2 {
            Ok(())
        } else {
            Err(format!("{masters} masters instead of {}", NODES / 2))
        }
    }

    /// Returns the URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// Opens a cluster connection. Every test opens its own, because a
    /// connection's task runs on the runtime of the test that opened it.
    pub async fn connect(&self) -> ClusterConnection {
        ClusterClient::new(self.urls())
            .expect("invalid cluster node urls")
            .get_async_connection()
            .await
            .expect("failed to connect to the local cluster")
    }

    /// Returns the client ports of the nodes that are masters now.
    pub fn master_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .copied()
            .filter(|&port| {
                let mut conn = sync_connection(port)
                    .unwrap_or_else(|e| panic!("failed to connect to node {port}: {e}"));
                role(&mut conn).unwrap_or_else(|e| panic!("{e}")) == "master"
            })
            .collect()
    }

    /// Returns the client ports of the nodes that are replicas now.
    pub fn replica_ports(&self) -> Vec<u16> {
        let masters = self.master_ports();
        self.ports
            .iter()
            .copied()
            .filter(|port| !masters.contains(port))
            .collect()
    }

    /// Promotes replica `port` with a manual CLUSTER FAILOVER, which waits for
    /// the replica to catch up with its master, and waits until the replica is
    /// a master and the cluster is ready again.
    pub fn fail_over_to(&self, port: u16) {
        let mut conn = sync_connection(port)
            .unwrap_or_else(|e| panic!("failed to connect to replica {port}: {e}"));
        // A manual failover times out while the replica is still in its first
        // sync, or while a master does not list it as a replica yet.
        let mut waiting = String::new();
        for round in 0..=WAIT_ROUNDS {
            assert!(
                round < WAIT_ROUNDS,
                "replica {port} never became ready: {waiting}"
            );
            match replica_readiness(&mut conn, port, &self.ports) {
                Ok(()) => break,
                Err(reason) => waiting = reason,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("CLUSTER FAILOVER on {port} failed: {e}"));
        let mut last = String::new();
        for _ in 0..WAIT_ROUNDS {
            let promoted = role(&mut conn).map(|role| role == "master");
            match (promoted, self.readiness()) {
                (Ok(true), Ok(())) => return,
                (Ok(false), _) => last = format!("node {port} is not a master yet"),
                (Err(reason), _) | (_, Err(reason)) => last = reason,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the failover to node {port} never finished: {last}");
    }

    /// Moves hash slot `slot` with its keys to master `target` while the
    /// cluster serves: IMPORTING and MIGRATING marks, MIGRATE of every key,
    /// then SETSLOT NODE on every master.
    pub fn move_slot(&self, slot: u16, target: u16) {
        let source = self.slot_owner(slot);
        assert_ne!(source, target, "slot {slot} is already on master {target}");
        let source_id = node_id(source);
        let target_id = node_id(target);
        let mut source_conn = sync_connection(source).unwrap();
        let mut target_conn = sync_connection(target).unwrap();
        let set_slot = |conn: &mut redis::Connection, state: &str, id: &str| {
            let () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .query(conn)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} failed: {e}"));
        };
        set_slot(&mut target_conn, "IMPORTING", &source_id);
        set_slot(&mut source_conn, "MIGRATING", &target_id);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut source_conn)
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(target)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut source_conn)
                .unwrap_or_else(|e| panic!("MIGRATE of {keys:?} failed: {e}"));
        }
        for port in self.master_ports() {
            let mut conn = sync_connection(port).unwrap();
            set_slot(&mut conn, "NODE", &target_id);
        }
    }

    /// Returns the client port of the master that serves `slot`, from CLUSTER SLOTS.
    pub fn slot_owner(&self, slot: u16) -> u16 {
        let mut conn = sync_connection(self.ports[0]).unwrap();
        let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<Vec<redis::Value>>>(&mut conn)
            .unwrap()
            .into_iter()
            .map(|range| {
                let mut fields = range.into_iter();
                let first = redis::from_redis_value(fields.next().unwrap()).unwrap();
                let last = redis::from_redis_value(fields.next().unwrap()).unwrap();
                let master: Vec<redis::Value> =
                    redis::from_redis_value(fields.next().unwrap()).unwrap();
                let mut master = master.into_iter();
                let host = redis::from_redis_value(master.next().unwrap()).unwrap();
                let port = redis::from_redis_value(master.next().unwrap()).unwrap();
                (first, last, (host, port))
            })
            .collect();
        ranges
            .into_iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, (_, port))| port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Connects to every master, each without cluster routing.
    pub async fn masters(&self) -> Vec<MultiplexedConnection> {
        let mut masters = Vec::new();
        for port in self.master_ports() {
            masters.push(node_connection(port).await);
        }
        masters
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("node logs of the failed cluster: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The shared cluster, alive while at least one test has a reference to it.
static SHARED: Mutex<Weak<LocalCluster>> = Mutex::new(Weak::new());

/// Returns the cluster shared by the tests of this binary, and starts it when
/// no running test has it. It stops when the last test that has it drops it.
///
/// Key prefixes keep the tests apart on it. A test that reads command counters
/// starts a cluster of its own instead.
pub fn shared_cluster() -> Arc<LocalCluster> {
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(LocalCluster::start());
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// Checks that replica `port` is in sync with its master, and that every node
/// in `ports` lists it as a replica. A master grants its failover vote only
/// to a node that it lists as a replica.
fn replica_readiness(conn: &mut redis::Connection, port: u16, ports: &[u16]) -> Result<(), String> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(conn)
        .map_err(|e| format!("INFO replication on {port}: {e}"))?;
    if !info.contains("master_link_status:up") {
        return Err(format!("replica {port} is not in sync"));
    }
    for &other in ports {
        let mut other_conn = sync_connection(other).map_err(|e| format!("node {other}: {e}"))?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut other_conn)
            .map_err(|e| format!("CLUSTER NODES on {other}: {e}"))?;
        let listed = nodes.lines().any(|line| {
            let mut fields = line.split(' ');
            let address = fields.nth(1).unwrap_or("");
            let flags = fields.next().unwrap_or("");
            address.starts_with(&format!("127.0.0.1:{port}@"))
                && flags.split(',').any(|flag| flag == "slave")
        });
        if !listed {
            return Err(format!("node {other} does not list {port} as a replica"));
        }
    }
    Ok(())
}

/// Returns `count` distinct loopback ports that were free a moment ago.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("failed to bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

fn wait_for_port(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..WAIT_ROUNDS {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server on port {port} did not accept connections within about 20 s");
}

fn sync_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_connection()
}

/// Returns the cluster node id of the node on `port`.
fn node_id(port: u16) -> String {
    let mut conn = sync_connection(port).unwrap();
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("CLUSTER MYID on {port} failed: {e}"))
}

/// Returns the hash slot of `key`, from CLUSTER KEYSLOT on node `port`.
pub fn key_slot(port: u16, key: &str) -> u16 {
    let mut conn = sync_connection(port).unwrap();
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key} failed: {e}"))
}

/// Returns the first field of ROLE: `master` or `slave`.
fn role(conn: &mut redis::Connection) -> Result<String, String> {
    let reply: Vec<redis::Value> = redis::cmd("ROLE")
        .query(conn)
        .map_err(|e| format!("ROLE failed: {e}"))?;
    let first = reply.into_iter().next().ok_or("empty ROLE reply")?;
    redis::from_redis_value(first).map_err(|e| format!("unexpected ROLE reply: {e}"))
}

/// Connects to one node without cluster routing.
pub async fn node_connection(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("invalid node url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("failed to connect to node {port}: {e}"))
}

/// Lists the keys under `prefix` on one node.
pub async fn keys_on_node(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    crate::common::keys_under(conn, prefix).await
}

/// Returns the `PTTL` of `key`: -2 when it does not exist, -1 when it has no TTL.
pub async fn pttl(conn: &mut impl ConnectionLike, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// Reads one field of the hash of stream `id`.
pub async fn field(
    conn: &mut impl ConnectionLike,
    prefix: &str,
    id: &str,
    name: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("{prefix}{{{id}}}"))
        .arg(name)
        .query_async(conn)
        .await
        .unwrap()
}

/// Returns the key of index shard `shard`.
pub fn index_key(prefix: &str, shard: u16) -> String {
    format!("{prefix}active:{{{shard}}}")
}

/// Returns the number of entries in every index shard together.
pub async fn indexed_count(conn: &mut impl ConnectionLike, prefix: &str) -> u64 {
    let mut count = 0;
    for shard in 0..sse_resilience::INDEX_SHARDS {
        let entries: u64 = redis::cmd("ZCARD")
            .arg(index_key(prefix, shard))
            .query_async(conn)
            .await
            .unwrap();
        count += entries;
    }
    count
}

/// Successful calls per command on one node, from `INFO commandstats`, keyed
/// by the name Redis uses there (`evalsha`, `zadd`, `cluster|slots`).
pub async fn command_calls(conn: &mut MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    parse_command_calls(&info)
}

/// Parses `cmdstat_<name>:calls=<n>,...,failed_calls=<f>` lines into
/// `<name>` and `n - f`.
pub fn parse_command_calls(info: &str) -> HashMap<String, u64> {
    let mut calls = HashMap::new();
    for line in info.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        let stat = |wanted: &str| -> u64 {
            stats
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, _)| *key == wanted)
                .map_or(0, |(_, value)| {
                    value
                        .parse()
                        .unwrap_or_else(|e| panic!("invalid {wanted} in {line:?}: {e}"))
                })
        };
        calls.insert(name.to_owned(), stat("calls") - stat("failed_calls"));
    }
    calls
}

/// Resets the command counters of one node.
pub async fn reset_stats(conn: &mut MultiplexedConnection) {
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .unwrap();
}

/// Loads the crate's Lua scripts on one node, so that no NOSCRIPT reply and
/// no SCRIPT LOAD shows in the counters that follow.
pub async fn load_scripts(conn: &mut MultiplexedConnection) {
    let scripts = [
        include_str!("../../src/scripts/open.lua"),
        include_str!("../../src/scripts/refresh.lua"),
        include_str!("../../src/scripts/complete.lua"),
        include_str!("../../src/scripts/release.lua"),
        include_str!("../../src/scripts/append.lua"),
        include_str!("../../src/scripts/follow.lua"),
        include_str!("../../src/scripts/orphan.lua"),
    ];
    for script in scripts {
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script)
            .query_async(conn)
            .await
            .unwrap();
    }
}
