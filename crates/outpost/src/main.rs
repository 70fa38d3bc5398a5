//! `outpost`: the edge node binary. Parses the CLI and wires the crates together; no request
//! logic lives here.
//!
//! # Layout
//! - `main.rs`: the CLI (`serve`, `check`, `purge`, `completions`).
//! - [`serve`]: node lifecycle — start, reload on SIGHUP, drain on SIGTERM/SIGINT.
//! - [`admin`]: the admin API (`/metrics`, `/livez`, `/readyz`, `/origins`, `/reload`,
//!   `/cache/purge`).
//! - [`purge`]: `outpost purge`, a client of the running node's admin API.

mod admin;
mod alloc;
mod analytics;
mod fleet;
mod functions_api;
mod purge;
mod serve;
mod state_api;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc instead of glibc malloc: a proxy allocates small, short-lived buffers on every
/// request, and this measured a lower CPU cost per request (see bench/README.md).
#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;
use outpost_config::{Config, ConfigError};

/// Outpost edge node: proxies, routes and guards requests in front of origin APIs.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an edge node with a config file (SIGHUP reloads it, SIGTERM drains and exits).
    Serve {
        /// Path to the node's TOML config.
        #[arg(short, long, env = "OUTPOST_CONFIG", default_value = "outpost.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when valid, 1 with diagnostics otherwise.
    Check {
        /// Path to the node's TOML config.
        #[arg(short, long, env = "OUTPOST_CONFIG", default_value = "outpost.toml")]
        config: PathBuf,
    },
    /// Purge the running node's cache by URL, prefix or tag (through its admin API; the admin
    /// address and token come from the config, `OUTPOST_ADMIN_TOKEN` overrides the token).
    Purge {
        /// Path to the node's TOML config.
        #[arg(short, long, env = "OUTPOST_CONFIG", default_value = "outpost.toml")]
        config: PathBuf,
        /// One URL, e.g. `https://shop.example.com/products/1?lang=en` (all its variants).
        #[arg(long, group = "target", required = true)]
        url: Option<String>,
        /// A URL prefix (`shop.example.com/products/`) or a path prefix on every host (`/products/`).
        #[arg(long, group = "target")]
        prefix: Option<String>,
        /// A tag the origin sent in `Surrogate-Key` or `Cache-Tag`.
        #[arg(long, group = "target")]
        tag: Option<String>,
        /// Mark stale instead of removing: stale-while-revalidate and stale-if-error still apply.
        #[arg(long)]
        soft: bool,
        /// Admin API address (`ip:port`) instead of the config's `[admin] addr`.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Deploy, list and roll back WebAssembly functions on the running node (through its admin
    /// API, like `purge`).
    Fn {
        /// Path to the node's TOML config.
        #[arg(
            short,
            long,
            env = "OUTPOST_CONFIG",
            default_value = "outpost.toml",
            global = true
        )]
        config: PathBuf,
        /// Admin API address (`ip:port`) instead of the config's `[admin] addr`.
        #[arg(long, global = true)]
        admin: Option<String>,
        #[command(subcommand)]
        command: FnSub,
    },
    /// Fleet operations (through NATS, with the config's `[fleet]` settings).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Print a shell completion script (e.g. `outpost completions bash > /etc/bash_completion.d/outpost`).
    Completions {
        /// Target shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum FnSub {
    /// Compile and validate a component, keep it as the function's next version and switch
    /// new requests to it; an invalid component is refused and the active version stays. On a
    /// node with `[fleet]`, every node of the fleet switches to it too.
    Deploy {
        /// Function name (a `[functions.NAME]` table of the config).
        name: String,
        /// The `.wasm` component.
        file: PathBuf,
    },
    /// Every function's versions, hashes, sources and which one is active.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: functions_api::ListFormat,
    },
    /// Switch back to VERSION, or to the newest version older than the active one (fleet-wide
    /// on a node with `[fleet]`).
    Rollback {
        /// Function name.
        name: String,
        /// Version number from `outpost fn list`.
        version: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Every node's last heartbeat and whether it is healthy (error rate and p99 over the
    /// health window against `[fleet] unhealthy_error_rate` / `unhealthy_p99`).
    Status {
        /// Path to a node's TOML config (for `[fleet]`).
        #[arg(short, long, env = "OUTPOST_CONFIG", default_value = "outpost.toml")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: fleet::StatusFormat,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "outpost", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Purge {
            config,
            url,
            prefix,
            tag,
            soft,
            admin,
        } => report(purge::run(&config, admin, url, prefix, tag, soft).map(|m| m + "\n")),
        Command::Fn {
            config,
            admin,
            command,
        } => {
            let cmd = match command {
                FnSub::Deploy { name, file } => functions_api::FnCommand::Deploy { name, file },
                FnSub::List { format } => functions_api::FnCommand::List { format },
                FnSub::Rollback { name, version } => {
                    functions_api::FnCommand::Rollback { name, version }
                }
            };
            report(functions_api::run(&config, admin, cmd))
        }
        Command::Fleet {
            command: FleetCommand::Status { config, format },
        } => report(fleet::status_command(&config, format)),
        // Diagnostics are already formatted; other errors get their cause chain.
        Command::Serve { config } => report(serve::run(&config).map(|()| String::new())),
    }
}

/// Prints a command's output, or its error with the cause chain; the exit status says which.
fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!(
                "{}: ok ({} listener(s), {} origin group(s), {} route(s))",
                path.display(),
                config.listeners.len(),
                config.origins.len(),
                config.routes.len()
            );
            ExitCode::SUCCESS
        }
        Err(ConfigError::Invalid(d)) => {
            let _ = write!(std::io::stderr(), "{}", d.render());
            ExitCode::FAILURE
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
