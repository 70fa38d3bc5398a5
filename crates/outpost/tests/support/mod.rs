//! The end-to-end test DSL: real FastAPI origins under uvicorn, real `outpost` processes,
//! ephemeral ports, and waits on conditions with deadlines instead of sleeps.
//!
//! ```ignore
//! let us = Origin::echo("us-west").await;
//! let node = Node::start(&NodeConfig::new().origin("api", &[(&us, PORTLAND)]).route("api", "/", "api")).await;
//! let resp = node.client().get(node.url("/echo/x")).send().await?;
//! ```

#![allow(dead_code, reason = "each test uses a different part of the DSL")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the repo is, to find the Python origins and the venv.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's Python (uvicorn origins, the center's NATS client).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python venv at {}: run scripts/py-env (or scripts/test) first",
        p.display()
    );
    p
}

/// Runs a Python snippet with the venv's interpreter (the center's clients: nats-py,
/// outpost_fastapi); panics with its stderr if it fails; returns its stdout.
pub fn run_python(script: &str) -> String {
    let out = Command::new(python())
        .args(["-c", script])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The example functions (`examples/functions/dist/*.wasm`), built from source once per test
/// run with the project's one build command.
pub fn guests() -> &'static Path {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = repo_root();
        let out = Command::new(root.join("scripts/build-functions"))
            .current_dir(&root)
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("scripts/build-functions runs");
        assert!(
            out.status.success(),
            "scripts/build-functions failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("examples/functions/dist")
    })
}

/// One compiled-component cache for every test node, so the Python function compiles once
/// per run rather than once per node.
pub fn wasm_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("outpost-wasm-cache")
}

/// `[functions.NAME]` TOML for an example guest, with extra settings.
pub fn function_toml(name: &str, guest: &str, settings: &str) -> String {
    format!(
        "[functions.{name}]\ncomponent = \"{}\"\n{settings}\n",
        guests().join(format!("{guest}.wasm")).display()
    )
}

/// Polls `cond` until it is true or `deadline` passes (then panics with `what`).
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Collects a child's output lines in the background.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn capture(&self, stream: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
        });
    }

    /// A copy of every line so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether any line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.all().iter().any(|l| l.contains(needle))
    }
}

/// A FastAPI origin served by uvicorn on a loopback port.
pub struct Origin {
    child: Option<Child>,
    /// The bound address.
    pub addr: SocketAddr,
    /// Region label the app reports in `X-Origin-Region`.
    pub region: String,
    app_dir: PathBuf,
    module: String,
    stderr: Lines,
    /// The app's SQLite file (`SALES_DB`): kept across restarts, as a real server keeps its disk.
    db: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Origin {
    /// The test origin (`tests/origin/echo_app.py`): echo, bytes, upload, slow, health switch.
    pub async fn echo(region: &str) -> Origin {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/origin");
        Origin::spawn(dir, "echo_app:app", region, 0).await
    }

    /// The echo origin over HTTPS (`uvicorn --ssl-*`); with `client_ca`, clients must present
    /// a certificate it signed (mutual TLS).
    pub async fn echo_tls(
        region: &str,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Origin {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/origin");
        let mut args: Vec<String> = vec![
            "--ssl-certfile".into(),
            cert.display().to_string(),
            "--ssl-keyfile".into(),
            key.display().to_string(),
        ];
        if let Some(ca) = client_ca {
            args.extend([
                "--ssl-ca-certs".into(),
                ca.display().to_string(),
                "--ssl-cert-reqs".into(),
                "2".into(),
            ]);
        }
        Origin::spawn_full(dir, "echo_app:app", region, 0, &[], &args).await
    }

    /// The retail example's central app.
    pub async fn retail(region: &str) -> Origin {
        Origin::retail_with_jwks(region, "http://127.0.0.1:9/unused").await
    }

    /// The retail app, verifying edge identities against `jwks_url`.
    pub async fn retail_with_jwks(region: &str, jwks_url: &str) -> Origin {
        Origin::spawn_with(
            repo_root().join("examples/retail"),
            "central:app",
            region,
            0,
            &[("OUTPOST_JWKS_URL", jwks_url)],
        )
        .await
    }

    async fn spawn(app_dir: PathBuf, module: &str, region: &str, port: u16) -> Origin {
        Origin::spawn_with(app_dir, module, region, port, &[]).await
    }

    async fn spawn_with(
        app_dir: PathBuf,
        module: &str,
        region: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> Origin {
        Origin::spawn_full(app_dir, module, region, port, env, &[]).await
    }

    async fn spawn_full(
        app_dir: PathBuf,
        module: &str,
        region: &str,
        port: u16,
        env: &[(&str, &str)],
        extra_args: &[String],
    ) -> Origin {
        let db = std::env::temp_dir().join(format!(
            "outpost-test-{}-{}-{}.db",
            region,
            std::process::id(),
            fastrand::u32(..)
        ));
        Origin::spawn_on(app_dir, module, region, port, env, extra_args, db).await
    }

    async fn spawn_on(
        app_dir: PathBuf,
        module: &str,
        region: &str,
        port: u16,
        env: &[(&str, &str)],
        extra_args: &[String],
        db: PathBuf,
    ) -> Origin {
        let mut child = Command::new(python())
            .args(["-m", "uvicorn", "--app-dir"])
            .arg(&app_dir)
            .arg(module)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--log-level", "info", "--no-access-log"])
            .args(extra_args)
            .env("REGION", region)
            .env("SALES_DB", &db)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("uvicorn starts");
        let stderr = Lines::default();
        if let Some(s) = child.stderr.take() {
            stderr.capture(s);
        }
        let start = Instant::now();
        let addr = loop {
            let found = stderr.all().iter().find_map(|l| {
                let rest = l
                    .split("Uvicorn running on http://")
                    .nth(1)
                    .or_else(|| l.split("Uvicorn running on https://").nth(1))?;
                rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
            });
            if let Some(a) = found {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "uvicorn exited with {status} before listening:\n{}",
                    stderr.all().join("\n")
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "uvicorn did not start:\n{}",
                stderr.all().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Origin {
            child: Some(child),
            addr,
            region: region.to_owned(),
            app_dir,
            module: module.to_owned(),
            stderr,
            db,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            args: extra_args.to_vec(),
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the origin process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the origin again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let again = Origin::spawn_on(
            self.app_dir.clone(),
            &self.module,
            &self.region,
            self.addr.port(),
            &env,
            &self.args.clone(),
            self.db.clone(),
        )
        .await;
        *self = again;
    }

    /// Requests `/cache/{name}` of the echo app received, any method.
    pub async fn cache_count(&self, name: &str) -> u64 {
        let v: serde_json::Value = client()
            .get(format!("{}/control/count/{name}", self.url()))
            .send()
            .await
            .expect("count")
            .json()
            .await
            .expect("json");
        v["n"].as_u64().unwrap_or(0)
    }

    /// `/slow` requests the echo app is sleeping on right now: proof a request is in flight.
    pub async fn slow_in_flight(&self) -> u64 {
        let hits: serde_json::Value = client()
            .get(format!("{}/control/hits", self.url()))
            .send()
            .await
            .expect("hits")
            .json()
            .await
            .expect("hits json");
        hits["slow_in_flight"].as_u64().unwrap_or(0)
    }

    /// Switches the echo app's `/healthz` between 200 and 503.
    pub async fn set_healthy(&self, healthy: bool) {
        let resp = client()
            .post(format!("{}/control/health", self.url()))
            .json(&serde_json::json!({ "healthy": healthy }))
            .send()
            .await
            .expect("control call");
        assert!(resp.status().is_success());
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Starts a GET in the background; the handle yields its status when it finishes.
pub fn spawn_get(url: String) -> tokio::task::JoinHandle<Result<u16, reqwest::Error>> {
    tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) })
}

/// Portland, Dublin, Tokyo, Paris: the geography of the tests.
pub const PORTLAND: (f64, f64) = (45.52, -122.68);
/// Dublin.
pub const DUBLIN: (f64, f64) = (53.35, -6.26);
/// Tokyo (where test nodes stand).
pub const TOKYO: (f64, f64) = (35.68, 139.69);
/// Paris.
pub const PARIS: (f64, f64) = (48.85, 2.35);

/// Builds a node config in TOML.
#[derive(Clone)]
pub struct NodeConfig {
    head: String,
    origins: String,
    routes: String,
    extra: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeConfig {
    /// A node `test-node` in Tokyo with one plain listener and an admin API on ephemeral ports.
    pub fn new() -> NodeConfig {
        NodeConfig {
            head: format!(
                "version = 1\n[node]\nid = \"test-node\"\nregion = \"ap-northeast\"\nlocation = {{ lat = {}, lon = {} }}\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"test-token\"\n",
                TOKYO.0, TOKYO.1
            ),
            origins: String::new(),
            routes: String::new(),
            extra: String::new(),
        }
    }

    /// Adds an origin group; `settings` is TOML for `[origins.NAME]` (timeouts, health …).
    pub fn origin(
        mut self,
        name: &str,
        endpoints: &[(&Origin, (f64, f64))],
        settings: &str,
    ) -> Self {
        self.origins
            .push_str(&format!("\n[origins.{name}]\n{settings}\n"));
        for (o, (lat, lon)) in endpoints {
            self.origins.push_str(&format!(
                "[[origins.{name}.endpoints]]\nurl = \"{}\"\nregion = \"{}\"\nlocation = {{ lat = {lat}, lon = {lon} }}\n",
                o.url(),
                o.region
            ));
        }
        self
    }

    /// Adds a route; `settings` is extra TOML inside the `[[routes]]` table.
    pub fn route(mut self, name: &str, prefix: &str, origin: &str, settings: &str) -> Self {
        self.routes.push_str(&format!(
            "\n[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\norigin = \"{origin}\"\n{settings}\n"
        ));
        self
    }

    /// Appends raw TOML (e.g. `[server]` or `[client_location]` sections).
    pub fn raw(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Renames the node (fleet tests need distinct ids: they name durable consumers).
    pub fn id(mut self, id: &str) -> Self {
        self.head = self
            .head
            .replace("id = \"test-node\"", &format!("id = \"{id}\""));
        self
    }

    /// Replaces the listener section (e.g. for TLS).
    pub fn listeners(mut self, toml: &str) -> Self {
        self.head = self
            .head
            .replace("[[listeners]]\naddr = \"127.0.0.1:0\"\n", toml);
        self
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}",
            self.head, self.extra, self.origins, self.routes
        )
    }
}

/// A node config whose one listener serves TLS with a fresh self-signed certificate for
/// `localhost`, written as `cert.pem`/`key.pem` into `dir` (start the node with
/// [`Node::start_in`] on that dir); with the certificate's DER, for clients to trust.
pub fn tls_listener(dir: &Path) -> (NodeConfig, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).expect("write cert.pem");
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).expect("write key.pem");
    let config = NodeConfig::new().listeners(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n",
    );
    (config, cert.cert.der().to_vec())
}

/// A running `outpost serve` process.
pub struct Node {
    child: Option<Child>,
    /// First listener address.
    pub addr: SocketAddr,
    /// Admin API address.
    pub admin: SocketAddr,
    /// Config file path (rewrite it and call [`Node::reload`]).
    pub config_path: PathBuf,
    /// Scratch directory holding the config (and certificates).
    pub dir: tempfile::TempDir,
    /// Everything the node printed on stdout (JSON logs).
    pub logs: Lines,
}

/// Path of the binary under test.
pub fn outpost_bin() -> &'static str {
    env!("CARGO_BIN_EXE_outpost")
}

impl Node {
    /// Writes the config to a temp dir and starts a node; waits for its ready line.
    pub async fn start(config: &NodeConfig) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        Node::start_in(dir, &config.render()).await
    }

    /// Starts a node whose config text is written into `dir` (which may hold certs).
    pub async fn start_in(dir: tempfile::TempDir, toml: &str) -> Node {
        let config_path = dir.path().join("outpost.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let mut child = Command::new(outpost_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("OUTPOST_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("outpost starts");
        let logs = Lines::default();
        if let Some(s) = child.stdout.take() {
            logs.capture(s);
        }
        if let Some(s) = child.stderr.take() {
            logs.capture(s);
        }
        let start = Instant::now();
        let ready = loop {
            let line = logs.all().into_iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(&l).ok()?;
                (v["message"] == "Outpost ready.").then_some(v)
            });
            if let Some(v) = line {
                break v;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "outpost exited with {status} before it was ready:\n{}",
                    logs.all().join("\n")
                );
            }
            // Generous: a node compiles its functions (seconds, on a cold cache) before it is ready.
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "outpost not ready:\n{}",
                logs.all().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let addr = ready["listeners"]
            .as_str()
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse().ok())
            .expect("listener address in ready line");
        let admin = ready["admin"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("admin address in ready line");
        Node {
            child: Some(child),
            addr,
            admin,
            config_path,
            dir,
            logs,
        }
    }

    /// `http://node/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://admin/path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends a signal (`libc::SIGHUP`, `libc::SIGTERM` …).
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.pid()).expect("pid fits");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        #[expect(unsafe_code, reason = "sending a signal to the child under test")]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "outpost did not exit in {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`, then the same config and data directory again (what a crash and a
    /// supervisor restart do).
    pub async fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let toml = std::fs::read_to_string(&self.config_path).expect("config");
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let fresh = Node::start_in(dir, &toml).await;
        *self = fresh;
    }

    /// A state API call with the test admin token; returns (status, JSON or text body).
    pub async fn state(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = client()
            .request(m, self.admin_url(path))
            .bearer_auth("test-token");
        if let Some(b) = body {
            req = req.body(b.to_owned());
        }
        let resp = req.send().await.expect("state API");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("state body");
        let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, value)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of one metric sample line (exact label text), 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The `/origins` JSON.
    pub async fn origins(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/origins"))
            .send()
            .await
            .expect("origins")
            .json()
            .await
            .expect("origins json")
    }

    /// Whether the endpoint at `addr` currently takes traffic.
    pub async fn available(&self, addr: SocketAddr) -> bool {
        let v = self.origins().await;
        v["origins"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["endpoints"].as_array().cloned().unwrap_or_default())
            .any(|e| e["endpoint"] == addr.to_string() && e["available"] == true)
    }

    /// Whether the endpoint at `addr` is out of rotation.
    pub async fn unavailable(&self, addr: SocketAddr) -> bool {
        !self.available(addr).await
    }

    /// Peak resident memory of the node process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub mod nats;
pub use nats::Nats;

/// Sends raw bytes on a fresh connection and returns everything the node answered until it
/// closed the connection or `deadline` passed.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(deadline, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A small in-process HTTP/2-only (h2c prior knowledge) origin that answers every request with
/// the protocol version it arrived on, for testing `protocol = "h2"` (uvicorn has no h2c).
pub async fn h2_origin() -> SocketAddr {
    use http_body_util::Full;
    use hyper::server::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{:?} {}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from(body),
                        )))
                    },
                );
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The values of header `name` in an echo app's description of a request, in order.
pub fn echoed<'a>(echo: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0] == name)
        .filter_map(|h| h[1].as_str())
        .collect()
}
