//! Helpers of the browser tests: headless Chromium driven through
//! chromedriver, the demo binary as a child process, and a TCP proxy that
//! cuts a connection mid-stream.

#![allow(dead_code)]

use std::{
    fs::File,
    future::Future,
    net::{SocketAddr, TcpStream as StdTcpStream},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::support::free_port;

/// How long a test waits for a page, a process or a port before it fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Serializes the browser tests: each runs a Chromium, and on two cores
/// several at once would make them slow and their timing erratic.
static BROWSER_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const INSTALL_HINT: &str = "the browser tests need Chromium and chromedriver: install them with \
     `apt-get install -y chromium chromium-driver` (Debian), or set CHROMIUM and CHROMEDRIVER \
     to their paths";

/// Runs one browser test: starts Chromium, runs `body`, saves a screenshot of
/// the final page as `final.png` in the test's output folder (also when the
/// body fails), closes the browser, and fails when the body failed.
pub async fn browser_test<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Client, PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    let _serial = BROWSER_TESTS.lock().await;
    let dir = output_dir(name);
    let mut driver = Chromedriver::start(&dir).await;
    let client = driver.connect().await;

    let outcome = AssertUnwindSafe(body(client.clone(), dir.clone()))
        .catch_unwind()
        .await;

    let screenshot = dir.join("final.png");
    match client.screenshot().await {
        Ok(png) => std::fs::write(&screenshot, png)
            .unwrap_or_else(|e| panic!("writing {} failed: {e}", screenshot.display())),
        Err(error) => eprintln!("taking the final screenshot failed: {error}"),
    }
    if let Err(error) = client.close().await {
        eprintln!("closing the browser session failed: {error}");
    }
    driver.stop();
    if let Err(panic) = outcome {
        eprintln!("output of {name}: {}", dir.display());
        std::panic::resume_unwind(panic);
    }
}

/// Returns `target/browser-tests/<name>`, emptied.
pub fn output_dir(name: &str) -> PathBuf {
    let dir = target_dir().join("browser-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating {} failed: {e}", dir.display()));
    dir
}

/// Returns the cargo target folder: the test binary is `<target>/<profile>/deps/<name>`.
fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("the profile folder has a parent")
        .to_owned()
}

fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the test binary is unknown");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary is not in <target>/<profile>/deps")
        .to_owned()
}

/// Finds `name` in `PATH`, unless the environment variable `env` names it.
fn executable(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} is not a file; {INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} was not found in PATH; {INSTALL_HINT}"))
}

/// A chromedriver process on a free loopback port, killed on drop.
pub struct Chromedriver {
    child: Option<Child>,
    port: u16,
    chromium: PathBuf,
}

impl Chromedriver {
    /// Starts chromedriver and waits until it accepts connections. Fails with
    /// the install command when Chromium or chromedriver is missing.
    pub async fn start(dir: &Path) -> Self {
        let chromium = executable("CHROMIUM", "chromium");
        let chromedriver = executable("CHROMEDRIVER", "chromedriver");
        let port = free_port();
        let log = File::create(dir.join("chromedriver.log")).expect("creating the log failed");
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().expect("cloning the log handle failed"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", chromedriver.display()));
        let driver = Self {
            child: Some(child),
            port,
            chromium,
        };
        wait_for_port(port, "chromedriver").await;
        driver
    }

    /// Opens a session of headless Chromium that resolves no host name but
    /// 127.0.0.1, so the browser reaches nothing beyond the loopback interface.
    pub async fn connect(&self) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": self.chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-domain-reliability",
                    "--no-first-run",
                    "--no-pings",
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                    "--window-size=900,1100",
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("the capabilities are an object");
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("starting a Chromium session failed: {e}; {INSTALL_HINT}"))
    }

    /// Kills chromedriver and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn wait_for_port(port: u16, what: &str) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + PATIENCE;
    while StdTcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not accept connections on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A demo server process, killed on drop.
pub struct Demo {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Demo {
    /// Starts the built demo on `port` against `redis_url`, with a heartbeat of
    /// 1 s, a stale threshold of 2 s and a guardian sweep every second, and
    /// waits until its `/healthz` responds. Its log goes to `log`.
    pub async fn start(port: u16, redis_url: &str, log: PathBuf) -> Self {
        let binary = demo_binary();
        let file = File::create(&log).expect("creating the demo log failed");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(&binary)
            .env("ADDR", addr.to_string())
            .env("REDIS_URL", redis_url)
            .env("HEARTBEAT_SECS", "1")
            .env("STALE_SECS", "2")
            .env("GUARDIAN_SECS", "1")
            .env("RUST_LOG", "info,sse_resilience=debug")
            .env("NO_COLOR", "1")
            .env_remove("REDIS_CLUSTER_NODES")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("cloning the log handle failed"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", binary.display()));
        let mut demo = Self {
            child: Some(child),
            addr,
            log,
        };
        demo.wait_until_healthy().await;
        demo
    }

    async fn wait_until_healthy(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the demo exited with {status} before it responded; see {}",
                    self.log.display()
                );
            }
            if self.health().await.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the demo did not respond to /healthz on {}; see {}",
                self.addr,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn health(&self) -> Option<Value> {
        let response = reqwest::get(format!("http://{}/healthz", self.addr))
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        serde_json::from_slice(&response.bytes().await.ok()?).ok()
    }

    /// Returns the number of generations the demo has started.
    pub async fn generations(&self) -> u64 {
        let health = self
            .health()
            .await
            .expect("the demo did not respond to /healthz");
        health["generations"]
            .as_u64()
            .unwrap_or_else(|| panic!("/healthz has no generation count: {health}"))
    }

    /// Returns the URL of `path` on the demo.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Returns the path of the demo built by cargo, and fails when it is missing
/// or older than the sources (`cargo test --test browser` alone does not
/// build examples).
fn demo_binary() -> PathBuf {
    let binary = profile_dir()
        .join("examples")
        .join(format!("demo{}", std::env::consts::EXE_SUFFIX));
    let hint = "run `cargo build --example demo` first (a plain `cargo test` builds it)";
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("the demo binary {} is missing: {hint}", binary.display()));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let newest_source = ["src", "examples"]
        .iter()
        .map(|dir| newest_mtime(&manifest.join(dir)))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    assert!(
        built >= newest_source,
        "the demo binary {} is older than the sources: {hint}",
        binary.display()
    );
    binary
}

fn newest_mtime(path: &Path) -> SystemTime {
    let Ok(metadata) = std::fs::metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    let own = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if !metadata.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| newest_mtime(&entry.path()))
        .fold(own, SystemTime::max)
}

/// A TCP proxy on a free loopback port in front of `upstream`. The first
/// connection whose response bytes contain the marker is cut right after
/// the marker: the rest of the response is never sent, and both sides are
/// closed. Every other connection is forwarded untouched.
pub struct CutProxy {
    pub addr: SocketAddr,
    cuts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Starts the proxy.
    pub async fn start(upstream: SocketAddr, marker: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy failed");
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let task = {
            let cuts = cuts.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (cuts, armed) = (cuts.clone(), armed.clone());
                    tokio::spawn(forward(client, upstream, marker, armed, cuts));
                }
            })
        };
        Self { addr, cuts, task }
    }

    /// Returns the number of connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Returns the URL of `path` through the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    marker: &'static [u8],
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });

    // The last bytes sent, so that a marker split over two reads is found too.
    let mut tail: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        if armed.load(Ordering::SeqCst) {
            let mut window = tail.clone();
            window.extend_from_slice(chunk);
            if let Some(start) = find(&window, marker)
                && armed.swap(false, Ordering::SeqCst)
            {
                let end_in_chunk = start + marker.len() - tail.len();
                let _ = client_write.write_all(&chunk[..end_in_chunk]).await;
                let _ = client_write.flush().await;
                cuts.fetch_add(1, Ordering::SeqCst);
                // Dropping every half closes both connections.
                requests.abort();
                return;
            }
            let keep = window.len().saturating_sub(marker.len());
            tail = window.split_off(keep);
        }
        if client_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = client_write.shutdown().await;
    requests.abort();
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Returns the `textContent` of the element with id `id`.
pub async fn text_of(client: &Client, id: &str) -> String {
    let value = client
        .execute(
            "const element = document.getElementById(arguments[0]); \
             return element ? element.textContent : null;",
            vec![json!(id)],
        )
        .await
        .unwrap_or_else(|e| panic!("reading #{id} failed: {e}"));
    value
        .as_str()
        .unwrap_or_else(|| panic!("the page has no element #{id}"))
        .to_owned()
}

/// Waits until the page's status is `expected`, and fails with the page's
/// status, output and event log when it is not within [`PATIENCE`].
pub async fn wait_for_status(client: &Client, expected: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = text_of(client, "status").await;
        if status == expected {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "the page status is {status:?}, expected {expected:?}\noutput: {}\nlog:\n{}",
                text_of(client, "output").await,
                text_of(client, "log").await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the page has logged at least `count` token events.
pub async fn wait_for_tokens(client: &Client, count: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = text_of(client, "log").await;
        if logged_tokens(&log).len() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the page logged fewer than {count} tokens:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sets the generation form of the demo page and clicks its start button.
/// Returns the stream id the page chose.
pub async fn start_generation(client: &Client, tokens: u32, delay_ms: u32) -> String {
    for (id, value) in [("tokens", tokens), ("delay", delay_ms)] {
        let input = client
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("the page has no #{id}: {e}"));
        input.clear().await.expect("clearing an input failed");
        input
            .send_keys(&value.to_string())
            .await
            .expect("typing into an input failed");
    }
    client
        .find(Locator::Id("start"))
        .await
        .expect("the page has no start button")
        .click()
        .await
        .expect("clicking the start button failed");
    let stream_id = text_of(client, "stream-id").await;
    assert!(
        stream_id.starts_with("demo-"),
        "the page shows no new stream id: {stream_id:?}"
    );
    stream_id
}

/// Parses the token events in the page's log into (event id, word), in order.
pub fn logged_tokens(log: &str) -> Vec<(u32, String)> {
    log.lines()
        .filter_map(|line| line.strip_prefix("token #"))
        .map(|rest| {
            let (id, word) = rest
                .split_once(": ")
                .unwrap_or_else(|| panic!("unexpected token line {rest:?}"));
            let id = id
                .parse()
                .unwrap_or_else(|_| panic!("token id {id:?} is not a number"));
            (id, word.to_owned())
        })
        .collect()
}

/// Checks that the log contains tokens 0 to `count - 1`, each once and in
/// order, and that the page's output is their words joined by spaces.
pub async fn assert_whole_result(client: &Client, count: u32) {
    let log = text_of(client, "log").await;
    let tokens = logged_tokens(&log);
    let ids: Vec<u32> = tokens.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (0..count).collect::<Vec<_>>(),
        "token events missing, doubled or out of order; log:\n{log}"
    );
    let words: Vec<&str> = tokens.iter().map(|(_, word)| word.as_str()).collect();
    assert_eq!(
        text_of(client, "output").await,
        words.join(" "),
        "the shown result differs from the streamed tokens; log:\n{log}"
    );
    assert_eq!(
        log.lines().filter(|l| l.starts_with("completed #")).count(),
        1,
        "expected one completed event; log:\n{log}"
    );
}
