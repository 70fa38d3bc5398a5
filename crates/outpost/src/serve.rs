//! `outpost serve`: start the node, reload on SIGHUP (or `POST /reload`), drain on SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, anyhow};
use outpost_config::{Config, ConfigError, LogFormat};
use outpost_proxy::{Node, Server};
use outpost_telemetry::{Metrics, logging};
use tokio::signal::unix::{SignalKind, signal};

use crate::{admin, fleet};

/// Version reported in metrics and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared by the signal loop and the admin API.
pub struct Lifecycle {
    /// The config file, re-read on every reload.
    pub config_path: PathBuf,
    /// The running node.
    pub node: Arc<Node>,
    /// Its listeners.
    pub server: Arc<Server>,
    /// Set once listeners are bound; `/readyz` reports it.
    pub ready: AtomicBool,
    /// Set when draining starts; `/readyz` turns 503 so balancers stop sending traffic.
    pub draining: AtomicBool,
    /// Token for mutating admin calls; none means those calls are disabled.
    pub admin_token: Option<String>,
    /// The node's local store (KV, CRDTs).
    pub store: outpost_state::Store,
    /// The fleet link, when `[fleet]` is configured.
    pub fleet: Option<outpost_fleet::Fleet>,
    /// Serialises reloads (SIGHUP and admin may race).
    reload_lock: tokio::sync::Mutex<()>,
}

impl Lifecycle {
    /// Re-reads the config file and swaps it in atomically; on any problem the running config
    /// stays and the problem is returned as text for the operator.
    pub async fn reload(&self) -> Result<(), String> {
        let _serial = self.reload_lock.lock().await;
        let result = self.try_reload().await;
        self.node.metrics().config_reload(result.is_ok());
        result
    }

    async fn try_reload(&self) -> Result<(), String> {
        let config = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(ConfigError::Invalid(d)) => return Err(d.render()),
            Err(e) => return Err(e.to_string()),
        };
        let current = self.node.snapshot().config.clone();
        if config.admin.addr != current.admin.addr {
            tracing::warn!(
                old = %current.admin.addr,
                new = %config.admin.addr,
                "The admin address changes only on restart; keeping the old one."
            );
        }
        if config.node.data_dir != current.node.data_dir
            || format!("{:?}", config.fleet) != format!("{:?}", current.fleet)
            || format!("{:?}", config.state) != format!("{:?}", current.state)
        {
            tracing::warn!(
                "[node] data_dir, [state] and [fleet] change only on restart; keeping the running store and fleet link."
            );
        }
        let plan = self.server.plan(&config).await.map_err(|e| e.to_string())?;
        // Functions first: a route may name a function the new config adds.
        match self.node.functions() {
            Some(f) => f.configure(&config).await.map_err(|e| e.to_string())?,
            None => attach_functions(&self.node, &config, &self.store)
                .await
                .map_err(|e| format!("{e:#}"))?,
        }
        self.node.reload(config).await.map_err(|e| e.to_string())?;
        self.server.commit(plan);
        Ok(())
    }
}

/// Opens the functions registry when the config has functions (compiling what its cache lacks)
/// and gives it to the node.
async fn attach_functions(
    node: &Arc<Node>,
    config: &Config,
    store: &outpost_state::Store,
) -> anyhow::Result<()> {
    if config.functions.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let functions = outpost_functions::Functions::open(
        config,
        &config.base_dir.join(&config.node.data_dir),
        store.clone(),
        node.metrics().clone(),
    )
    .await
    .context("cannot load the functions")?;
    tracing::info!(
        functions = config.functions.len(),
        ms = started.elapsed().as_millis() as u64,
        "Functions loaded."
    );
    node.attach_functions(Arc::new(functions));
    Ok(())
}

/// Loads the config, runs the node until SIGTERM/SIGINT, drains and returns.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(ConfigError::Invalid(d)) => return Err(anyhow!("{}", d.render().trim_end())),
        Err(e) => return Err(e.into()),
    };
    let format = match config.log.format {
        LogFormat::Auto => logging::Format::Auto,
        LogFormat::Json => logging::Format::Json,
        LogFormat::Text => logging::Format::Text,
    };
    logging::init(format, &config.log.level);
    let workers = match config.node.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder
        .enable_all()
        .thread_name("outpost-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(path.to_path_buf(), config))
}

pub fn admin_token(config: &Config) -> anyhow::Result<Option<String>> {
    // Surrounding whitespace could never be sent: header values are trimmed.
    if let Ok(t) = std::env::var("OUTPOST_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(Some(t.trim().to_owned()));
    }
    if let Some(file) = &config.admin.token_file {
        let path = config.base_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read admin token file {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_owned();
        if token.is_empty() {
            return Err(anyhow!("admin token file {} is empty", path.display()));
        }
        return Ok(Some(token));
    }
    Ok(config
        .admin
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned))
}

async fn serve(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let token = admin_token(&config)?;
    let drain_timeout = config.server.drain_timeout;
    let admin_addr = config.admin.addr.clone();
    let node_id = config.node.id.clone();
    let metrics = Metrics::new(VERSION);
    let store = fleet::open_store(&config).await?;
    let background = tokio_util::sync::CancellationToken::new();
    fleet::spawn_sweeper(
        store.clone(),
        config.state.sweep_interval,
        background.clone(),
    );
    let fleet_config = config.clone();
    let node = Node::new(config, metrics)
        .await
        .context("cannot build the node from its config")?;
    node.attach_store(store.clone());
    attach_functions(&node, &fleet_config, &store).await?;
    outpost_proxy::outbox::spawn_deliverer(node.clone(), store.clone(), background.clone());
    let fleet_link = fleet::start(
        &fleet_config,
        store.clone(),
        node.clone(),
        background.clone(),
    )
    .await?;
    if let Some(analytics) = crate::analytics::open(&fleet_config).await? {
        node.attach_analytics(analytics.clone());
        let js = fleet_link.as_ref().map(outpost_fleet::Fleet::jetstream);
        let metrics = node.metrics().clone();
        let report = move |s: &outpost_state::analytics::StatsSnapshot, pending: u64| {
            metrics.analytics(
                s.events_accepted,
                s.events_rejected,
                s.summaries_sent,
                s.summaries_failed,
                pending,
            );
        };
        crate::analytics::spawn(analytics, &fleet_config, js, report, background.clone())?;
    }
    drop(fleet_config);
    let server = Server::start(node.clone()).await?;
    let admin_listener = tokio::net::TcpListener::bind(&admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin address {admin_addr}"))?;
    let admin_local = admin_listener.local_addr()?;

    let life = Arc::new(Lifecycle {
        config_path,
        node,
        server: server.clone(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        admin_token: token,
        store,
        fleet: fleet_link,
        reload_lock: tokio::sync::Mutex::new(()),
    });
    let admin_shutdown = tokio_util::sync::CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        life.clone(),
        admin_shutdown.clone(),
    ));

    let mut listeners: Vec<String> = server
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    listeners.sort();
    life.ready.store(true, Ordering::Release);
    tracing::info!(
        node = %node_id,
        version = VERSION,
        listeners = %listeners.join(","),
        admin = %admin_local,
        "Outpost ready."
    );

    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match life.reload().await {
                    Ok(()) => tracing::info!("Configuration reloaded."),
                    Err(e) => tracing::error!(diagnostics = %e, "Configuration rejected; the previous one keeps serving."),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    life.draining.store(true, Ordering::Release);
    let open = server.open_connections();
    tracing::info!(
        open_connections = open,
        timeout_secs = drain_timeout.as_secs_f64(),
        "Draining."
    );
    let drained = server.drain(drain_timeout).await;
    admin_shutdown.cancel();
    let _ = admin_task.await;
    if let Some(f) = &life.fleet {
        f.close().await;
    }
    background.cancel();
    // Objects stored during the last requests reach the disk tier before the process ends.
    let node = life.node.clone();
    let _ = tokio::task::spawn_blocking(move || node.cache().flush()).await;
    if drained {
        tracing::info!("Drained; exiting.");
    } else {
        tracing::warn!(
            open_connections = server.open_connections(),
            "Drain timeout reached; closing remaining connections."
        );
    }
    Ok(())
}
