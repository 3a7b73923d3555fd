//! Helpers of the command-line tests: the built `sse-resilience` binary, a
//! proxy process, and the Python SSE backend of `examples/sse_backend.py`.

#![allow(dead_code)]

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{
    common::redis_url,
    support::{free_port, wait_or_kill},
};

/// Path of the binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_sse-resilience");

/// The output of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary against the test Redis with `prefix`, then `args`, and
/// waits for it to exit (at most 60 s).
pub async fn run(prefix: &str, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["--redis", &redis_url(), "--key-prefix", prefix])
        .args(args)
        .env_remove("REDIS_CLUSTER_NODES")
        .kill_on_drop(true);
    run_command(command).await
}

/// Runs the binary with exactly `args`.
pub async fn run_raw(args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .kill_on_drop(true);
    run_command(command).await
}

async fn run_command(mut command: tokio::process::Command) -> Run {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command did not exit within 60 s")
        .expect("failed to run the sse-resilience binary");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs the binary against the test Redis with `prefix`, then `args`, with
/// stdout on a pipe whose reader takes the first `read_bytes` bytes and then
/// closes it, as `| head -c N` does. With `read_bytes` 0 the reader is closed
/// before the binary starts, so its first write fails. Returns the exit code
/// and stderr; `stdout` contains the bytes read.
pub async fn run_closing_stdout(prefix: &str, args: &[&str], read_bytes: usize) -> Run {
    let mut command = Command::new(BIN);
    command
        .args(["--redis", &redis_url(), "--key-prefix", prefix])
        .args(args)
        .env_remove("REDIS_CLUSTER_NODES")
        .env("RUST_BACKTRACE", "0");
    tokio::task::spawn_blocking(move || {
        let (reader, writer) = std::io::pipe().expect("failed to create a pipe");
        let mut reader = if read_bytes == 0 {
            drop(reader);
            None
        } else {
            Some(reader)
        };
        let stderr = std::env::temp_dir().join(format!(
            "sse-resilience-test-{}.stderr",
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = command
            .stdout(writer)
            .stderr(File::create(&stderr).expect("failed to create the stderr file"))
            .spawn()
            .expect("failed to start the sse-resilience binary");
        // The command keeps a copy of the writer: without dropping it, the
        // pipe would stay open after the child exits.
        drop(command);

        let mut head = vec![0; read_bytes];
        if let Some(reader) = reader.as_mut() {
            reader
                .read_exact(&mut head)
                .expect("the command wrote fewer bytes than the test reads");
        }
        drop(reader);

        let Some(status) = wait_or_kill(&mut child, Duration::from_secs(60)) else {
            panic!("the command did not exit within 60 s of its stdout closing");
        };
        let stderr_text = std::fs::read_to_string(&stderr).unwrap_or_default();
        let _ = std::fs::remove_file(&stderr);
        Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&head).into_owned(),
            stderr: stderr_text,
        }
    })
    .await
    .expect("the command runner panicked")
}

/// A long-running process of the binary (proxy or guardian), killed on drop.
/// Its log goes to a file, read by [`Process::logs`].
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts the binary against the test Redis with `prefix`, then `args`.
    pub fn start(prefix: &str, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "sse-resilience-test-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let child = Command::new(BIN)
            .args(["--redis", &redis_url(), "--key-prefix", prefix])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("REDIS_CLUSTER_NODES")
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("failed to create the log file"))
            .spawn()
            .expect("failed to start the sse-resilience binary");
        Self {
            child: Some(child),
            log,
        }
    }

    /// Returns what the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the logs when the process already exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the process was stopped");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the process exited with {status}:\n{}", self.logs());
        }
    }

    /// Sends SIGTERM and waits for the exit (at most 30 s).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the process was stopped");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("failed to run kill");
        assert!(status.success(), "kill -TERM failed");
        for _ in 0..1500 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the process did not exit within 30 s of SIGTERM:\n{}",
            self.logs()
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A proxy process on a free loopback port.
pub struct Proxy {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Proxy {
    /// Starts `sse-resilience proxy` in front of `upstream` with `args`, and
    /// waits until it accepts connections.
    pub async fn start(prefix: &str, upstream: &str, args: &[&str]) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listen = addr.to_string();
        let mut all = vec!["proxy", "--listen", &listen, "--upstream", upstream];
        all.extend_from_slice(args);
        let mut process = Process::start(prefix, &all);
        wait_for_port(addr, &mut process).await;
        Self { process, addr }
    }

    /// Returns the URL of `path` on the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn wait_for_port(addr: SocketAddr, process: &mut Process) {
    for _ in 0..1000 {
        process.assert_running();
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the proxy did not listen on {addr} within 20 s:\n{}",
        process.logs()
    );
}

/// The Python SSE backend on a free loopback port, killed on drop.
pub struct Backend {
    child: Child,
    pub addr: SocketAddr,
}

impl Backend {
    /// Starts `examples/sse_backend.py` and waits for its `listening on` line.
    pub fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sse_backend.py");
        let mut child = Command::new("python3")
            .args([script, "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start python3: is it installed?");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the backend printed no address within 20 s");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line of the backend: {line:?}"));
        Self { child, addr }
    }

    /// Returns the base URL of the backend.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns how many times `/stream/{id}` reached the backend.
    pub async fn calls(&self, id: &str) -> u64 {
        let text = reqwest::get(format!("{}/calls/{id}", self.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["calls"].as_u64().unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
