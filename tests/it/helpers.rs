//! Test support: start the real daemon binary on a temporary directory against a sandbox,
//! talk to it over its socket, kill it and restart it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use zoomq::sandbox::{Sandbox, SandboxConfig};

/// A daemon process with its own directory, socket and configuration.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
}

/// Configuration overrides: `(section, key, TOML value)`, applied over the test defaults.
#[derive(Default, Clone)]
pub struct Tweaks {
    pub entries: Vec<(String, String, String)>,
}

impl Tweaks {
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Tweaks {
        self.entries
            .push((section.to_string(), key.to_string(), value.to_string()));
        self
    }
}

impl TestDaemon {
    /// Starts a daemon delivering to `sandbox`, and waits until it answers a ping.
    pub async fn start(sandbox: &Sandbox, tweaks: Tweaks) -> TestDaemon {
        let mut daemon = TestDaemon::prepare(sandbox, tweaks);
        daemon.spawn().await;
        daemon
    }

    /// Writes a daemon's directory and configuration, without starting it.
    pub fn prepare(sandbox: &Sandbox, tweaks: Tweaks) -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("zoomq.sock");
        let config_path = dir.path().join("zoomq.toml");
        let quoted = |s: &str| format!("{s:?}");
        let mut sections: std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, String>,
        > = Default::default();
        let mut put = |section: &str, key: &str, value: String| {
            sections
                .entry(section.to_string())
                .or_default()
                .insert(key.to_string(), value);
        };
        put("socket", "path", quoted(&socket.display().to_string()));
        put(
            "storage",
            "path",
            quoted(&dir.path().join("data").display().to_string()),
        );
        put("storage", "cache_capacity", "16777216".into());
        put("storage", "min_free_bytes", "0".into());
        put("zoom", "api_base", quoted(&sandbox.api_base()));
        put("zoom", "token_url", quoted(&sandbox.token_url()));
        put("zoom", "client_id", quoted("sandbox-client"));
        put("zoom", "client_secret", quoted("sandbox-secret"));
        put("zoom", "connect_timeout", quoted("1s"));
        put("zoom", "request_timeout", quoted("5s"));
        put("delivery", "retry_initial", quoted("50ms"));
        put("delivery", "retry_max", quoted("500ms"));
        put("delivery", "shutdown_timeout", quoted("3s"));
        put("metrics", "listen", quoted(""));
        for (section, key, value) in tweaks.entries {
            put(&section, &key, value);
        }
        let mut config = String::new();
        for (section, entries) in sections {
            config.push_str(&format!("[{section}]\n"));
            for (key, value) in entries {
                config.push_str(&format!("{key} = {value}\n"));
            }
        }
        std::fs::write(&config_path, config).unwrap();
        TestDaemon {
            dir,
            socket,
            config_path,
            child: None,
        }
    }

    /// Starts the process (again) and waits for it to answer and to have read back every
    /// stored edit (recovery runs in the background after the socket answers).
    pub async fn spawn(&mut self) {
        self.spawn_answering().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.stats().await["recovering"] != false {
            assert!(
                Instant::now() < deadline,
                "zoomq did not finish its recovery\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts the process (again) and waits only for its socket to answer: recovery may
    /// still be running.
    pub async fn spawn_answering(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut client) = Client::connect(&self.socket).await {
                if client.call(&json!({"op": "ping"})).await["ok"] == true {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("zoomq exited during start-up: {status}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "zoomq did not start\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the process, without waiting for anything.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        let stderr = if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("daemon.log"))
                    .unwrap(),
            )
        };
        let child = Command::new(env!("CARGO_BIN_EXE_zoomq"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start zoomq");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM without waiting (the daemon starts its graceful shutdown).
    pub fn signal_term(&self) {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.terminate_timed().0
    }

    /// SIGTERM, then waits for the exit status; also returns how long the stop took, from
    /// the signal to the exit (a few milliseconds more: starting `kill`, the polling step).
    pub fn terminate_timed(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        // Counted from just before `kill` runs: an over- rather than an underestimate.
        let signalled = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = signalled + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, signalled.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "zoomq did not stop on SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    pub async fn stats(&self) -> Value {
        self.client().await.call(&json!({"op": "stats"})).await
    }

    /// Waits until nothing is pending or in flight (and recovery, which reads stored edits
    /// back after a start, is done: until then the counts are partial).
    pub async fn drained(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.stats().await;
            if stats["pending"] == 0 && stats["in_flight"] == 0 && stats["recovering"] == false {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "queue did not drain: {stats}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A producer connection.
pub struct Client {
    reader: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    pub writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(socket: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(socket).await?;
        let (reader, writer) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(reader).lines(),
            writer,
        })
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, request: &Value) {
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        self.send_raw(&line).await;
    }

    pub async fn answer(&mut self) -> Value {
        self.try_answer().await.expect("an answer within 20 s")
    }

    /// The next answer, or `None` if the connection ends or nothing comes within 20 s.
    pub async fn try_answer(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(Duration::from_secs(20), self.reader.next_line())
            .await
            .ok()?
            .ok()??;
        Some(serde_json::from_str(&line).expect("answers are JSON"))
    }

    pub async fn call(&mut self, request: &Value) -> Value {
        self.send(request).await;
        self.answer().await
    }
}

/// An edit request for `message_id` on `account` whose content carries `text`.
pub fn edit(message_id: &str, account: &str, text: &str) -> Value {
    json!({
        "op": "edit",
        "message_id": message_id,
        "account_id": account,
        "robot_jid": "bot@xmpp.zoom.us",
        "content": {"head": {"text": text}},
    })
}

/// The text the sandbox shows for a message.
pub fn shown(sandbox: &Sandbox, message_id: &str) -> Option<String> {
    sandbox
        .message(message_id)
        .and_then(|m| m.content)
        .and_then(|c| c["head"]["text"].as_str().map(str::to_string))
}

pub async fn sandbox(config: SandboxConfig) -> Sandbox {
    Sandbox::start(config).await.unwrap()
}
