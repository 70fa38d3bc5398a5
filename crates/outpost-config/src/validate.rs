//! The validation pass: what serde types cannot express, checked on the parsed model.
//!
//! Each check yields a [`Problem`] carrying the key path of the offending value; the
//! diagnostics module turns the path into a `file:line:col`. All problems are collected, not
//! just the first, so one `outpost check` run shows everything to fix.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::diagnostics::did_you_mean;
use crate::model::{Config, GeoPoint};

/// One step of a key path into the TOML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A validation failure before it is located in the source.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Key path of the value at fault (`routes`, 1, `origin`).
    pub path: Vec<PathSeg>,
    /// What is wrong.
    pub message: String,
    /// Short text under the caret.
    pub label: String,
    /// How to fix it.
    pub help: Option<String>,
}

struct Checker {
    problems: Vec<Problem>,
}

fn path(segs: &[&dyn AsSeg]) -> Vec<PathSeg> {
    segs.iter().map(|s| s.as_seg()).collect()
}

trait AsSeg {
    fn as_seg(&self) -> PathSeg;
}
impl AsSeg for &str {
    fn as_seg(&self) -> PathSeg {
        PathSeg::Key((*self).to_owned())
    }
}
impl AsSeg for String {
    fn as_seg(&self) -> PathSeg {
        PathSeg::Key(self.clone())
    }
}
impl AsSeg for usize {
    fn as_seg(&self) -> PathSeg {
        PathSeg::Index(*self)
    }
}

impl Checker {
    fn report(&mut self, path: Vec<PathSeg>, message: String, label: &str, help: Option<String>) {
        self.problems.push(Problem {
            path,
            message,
            label: label.to_owned(),
            help,
        });
    }

    fn name(&mut self, p: Vec<PathSeg>, what: &str, name: &str) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.report(
                p,
                format!("invalid {what} `{name}`"),
                "not a valid name",
                Some("use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.'".to_owned()),
            );
        }
    }

    fn point(&mut self, p: Vec<PathSeg>, g: &GeoPoint) {
        if !(-90.0..=90.0).contains(&g.lat) || !(-180.0..=180.0).contains(&g.lon) {
            self.report(
                p,
                format!("location ({}, {}) is not on Earth", g.lat, g.lon),
                "out of range",
                Some(
                    "latitude is -90..=90 and longitude -180..=180, in decimal degrees".to_owned(),
                ),
            );
        }
    }

    fn addr(&mut self, p: Vec<PathSeg>, addr: &str) -> Option<SocketAddr> {
        match addr.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.report(
                    p,
                    format!("`{addr}` is not a socket address"),
                    "expected ip:port",
                    Some(
                        "write an IP and a port, e.g. \"127.0.0.1:8080\" or \"[::]:443\""
                            .to_owned(),
                    ),
                );
                None
            }
        }
    }
}

/// Checks a parsed config; an empty result means it is valid.
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut c = Checker {
        problems: Vec::new(),
    };

    if config.version != 1 {
        c.report(
            path(&[&"version"]),
            format!("unsupported config version {}", config.version),
            "unknown version",
            Some("this build of outpost reads `version = 1`".to_owned()),
        );
    }

    c.name(path(&[&"node", &"id"]), "node id", &config.node.id);
    c.point(path(&[&"node", &"location"]), &config.node.location);

    check_server(&mut c, config);
    check_listeners(&mut c, config);
    check_client_location(&mut c, config);
    check_origins(&mut c, config);
    check_routes(&mut c, config);
    check_cache(&mut c, config);
    check_auth(&mut c, config);
    check_guards(&mut c, config);
    check_experiments(&mut c, config);
    check_internal_headers(&mut c, config);
    check_origin_tls(&mut c, config);
    check_fleet(&mut c, config);
    check_analytics(&mut c, config);
    check_functions(&mut c, config);
    c.problems
}

const ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
];

fn check_functions(c: &mut Checker, config: &Config) {
    let origin_names: Vec<&str> = config.origins.keys().map(String::as_str).collect();
    for (name, f) in &config.functions {
        c.name(path(&[&"functions", name]), "function name", name);
        let full = config.base_dir.join(&f.component);
        if !full.is_file() {
            c.report(
                path(&[&"functions", name, &"component"]),
                format!("component file {} does not exist", f.component.display()),
                "file not found",
                Some(
                    "paths are relative to the config file's directory; the examples are built \
                     by scripts/build-functions"
                        .to_owned(),
                ),
            );
        }
        if f.timeout.is_zero() {
            c.report(
                path(&[&"functions", name, &"timeout"]),
                format!("function `{name}` has a zero timeout"),
                "must be more than 0",
                Some("e.g. timeout = \"2s\"".to_owned()),
            );
        }
        if f.memory.as_u64() < 1 << 20 || f.memory.as_u64() > 4 << 30 {
            c.report(
                path(&[&"functions", name, &"memory"]),
                format!("function `{name}`: memory {} is out of range", f.memory),
                "between 1 MiB and 4 GiB",
                Some("e.g. memory = \"64MiB\" (a Python function needs about 32 MiB)".to_owned()),
            );
        }
        for (i, o) in f.origins.iter().enumerate() {
            if !config.origins.contains_key(o) {
                let help = match did_you_mean(o, &origin_names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("defined origins: {}", origin_names.join(", ")),
                };
                c.report(
                    path(&[&"functions", name, &"origins", &i]),
                    format!("function `{name}` may call unknown origin `{o}`"),
                    "no such origin",
                    Some(help),
                );
            }
        }
    }
    if config.wasm.max_instances == 0 || config.wasm.max_instances > 10_000 {
        c.report(
            path(&[&"wasm", &"max_instances"]),
            format!(
                "max_instances = {} is out of range",
                config.wasm.max_instances
            ),
            "between 1 and 10000",
            Some("each instance slot reserves address space; 256 suits most nodes".to_owned()),
        );
    }
    let fn_names: Vec<&str> = config.functions.keys().map(String::as_str).collect();
    for (i, r) in config.routes.iter().enumerate() {
        if let Some(resp) = &r.respond {
            if !(200..=599).contains(&resp.status) {
                c.report(
                    path(&[&"routes", &i, &"respond", &"status"]),
                    format!("route `{}` responds with status {}", r.name, resp.status),
                    "not a final status",
                    Some("use 200-599".to_owned()),
                );
            }
            if http::HeaderValue::from_str(&resp.content_type).is_err() {
                c.report(
                    path(&[&"routes", &i, &"respond", &"content_type"]),
                    format!("route `{}`: content_type is not a header value", r.name),
                    "invalid header value",
                    Some("e.g. \"application/json\"".to_owned()),
                );
            }
            if r.function.is_some() {
                c.report(
                    path(&[&"routes", &i, &"respond"]),
                    format!(
                        "route `{}` has both a fixed response and a function",
                        r.name
                    ),
                    "one or the other",
                    Some("drop `function` or [routes.respond]".to_owned()),
                );
            }
        }
        let Some(f) = &r.function else { continue };
        if !config.functions.contains_key(f) {
            let help = match did_you_mean(f, &fn_names) {
                Some(best) => format!("did you mean `{best}`?"),
                None if fn_names.is_empty() => {
                    "define it with a [functions.NAME] table and `component = \"path.wasm\"`"
                        .to_owned()
                }
                None => format!("defined functions: {}", fn_names.join(", ")),
            };
            c.report(
                path(&[&"routes", &i, &"function"]),
                format!("route `{}` runs unknown function `{f}`", r.name),
                "no such function",
                Some(help),
            );
        }
        if r.function.is_some() && r.outbox.is_some() {
            c.report(
                path(&[&"routes", &i, &"outbox"]),
                format!("route `{}` runs a function and has an outbox", r.name),
                "not together",
                Some("a function's writes go where the function sends them; drop [routes.outbox] or the function".to_owned()),
            );
        }
    }
}

fn check_origin_tls(c: &mut Checker, config: &Config) {
    for (name, g) in &config.origins {
        let Some(t) = &g.tls else { continue };
        if t.client_cert.is_some() != t.client_key.is_some() {
            c.report(
                path(&[&"origins", name, &"tls"]),
                format!(
                    "origin `{name}`: a client certificate needs both client_cert and client_key"
                ),
                "half a client certificate",
                Some("set both (PEM chain and PEM private key), or neither".to_owned()),
            );
        }
    }
}

fn check_internal_headers(c: &mut Checker, config: &Config) {
    for (i, h) in config.server.internal_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            c.report(
                path(&[&"server", &"internal_headers", &i]),
                format!("`{h}` is not a header name"),
                "invalid header name",
                Some("header names are tokens such as \"x-internal-user\"".to_owned()),
            );
        }
    }
}

fn check_experiments(c: &mut Checker, config: &Config) {
    let names: Vec<&str> = config.experiments.iter().map(|e| e.name.as_str()).collect();
    for (i, e) in config.experiments.iter().enumerate() {
        c.name(
            path(&[&"experiments", &i, &"name"]),
            "experiment name",
            &e.name,
        );
        if e.variants.iter().map(|v| u64::from(v.weight)).sum::<u64>() == 0 {
            c.report(
                path(&[&"experiments", &i, &"variants"]),
                format!("experiment `{}` has no variant with a weight", e.name),
                "no weight",
                Some("e.g. variants = [{ name = \"a\", weight = 50 }, { name = \"b\", weight = 50 }]".to_owned()),
            );
        }
        for (j, v) in e.variants.iter().enumerate() {
            c.name(
                path(&[&"experiments", &i, &"variants", &j, &"name"]),
                "variant name",
                &v.name,
            );
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        for (j, name) in r.experiments.iter().enumerate() {
            if !names.contains(&name.as_str()) {
                let help = match did_you_mean(name, &names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => "define it with an [[experiments]] table".to_owned(),
                };
                c.report(
                    path(&[&"routes", &i, &"experiments", &j]),
                    format!("route `{}` uses unknown experiment `{name}`", r.name),
                    "no such experiment",
                    Some(help),
                );
            }
        }
    }
}

fn check_guards(c: &mut Checker, config: &Config) {
    let regions: Vec<&str> = config
        .origins
        .values()
        .flat_map(|g| g.endpoints.iter().map(|e| e.region.as_str()))
        .collect();
    for (i, r) in config.routes.iter().enumerate() {
        for (j, l) in r.rate_limits.iter().enumerate() {
            let at = |k: &str| path(&[&"routes", &i, &"rate_limits", &j, &k.to_owned()]);
            let key_ok = matches!(l.key.as_str(), "ip" | "sub" | "route")
                || l.key
                    .strip_prefix("header:")
                    .is_some_and(|h| http::HeaderName::from_bytes(h.trim().as_bytes()).is_ok());
            if !key_ok {
                c.report(
                    at("key"),
                    format!("`{}` is not a rate-limit key", l.key),
                    "unknown key",
                    Some("use \"ip\", \"sub\", \"route\" or \"header:<name>\"".to_owned()),
                );
            }
            if l.rate == 0
                || l.per.is_zero()
                || l.burst == Some(0)
                || l.per / l.rate.max(1) < std::time::Duration::from_nanos(1)
            {
                c.report(
                    at("rate"),
                    format!(
                        "rate limit `{}` must allow at least one request per period",
                        l.name
                    ),
                    "no allowance",
                    Some("e.g. rate = 100, per = \"1m\"".to_owned()),
                );
            }
            if l.key == "sub" && r.auth.is_none() {
                c.report(
                    at("key"),
                    format!(
                        "rate limit `{}` counts by `sub` but the route does not authenticate",
                        l.name
                    ),
                    "no subject",
                    Some("add a [routes.auth] section, or count by \"ip\"".to_owned()),
                );
            }
        }
        if let Some(g) = &r.geo {
            for (list, key) in [
                (&g.allow_countries, "allow_countries"),
                (&g.deny_countries, "deny_countries"),
            ] {
                for (j, code) in list.iter().enumerate() {
                    check_country(c, path(&[&"routes", &i, &"geo", &key, &j]), code);
                }
            }
        }
        for (j, region) in r.residency.iter().enumerate() {
            let serving: Vec<&str> = config
                .origins
                .get(&r.origin)
                .map(|g| g.endpoints.iter().map(|e| e.region.as_str()).collect())
                .unwrap_or_default();
            if !serving.contains(&region.as_str()) {
                let help = match did_you_mean(region, &regions) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!(
                        "origin `{}` has endpoints in: {}",
                        r.origin,
                        serving.join(", ")
                    ),
                };
                c.report(
                    path(&[&"routes", &i, &"residency", &j]),
                    format!("origin `{}` has no endpoint in region `{region}`", r.origin),
                    "no such region",
                    Some(help),
                );
            }
        }
    }
}

fn check_auth(c: &mut Checker, config: &Config) {
    for (i, r) in config.routes.iter().enumerate() {
        let Some(a) = &r.auth else { continue };
        let at = |key: &str| path(&[&"routes", &i, &"auth", &key.to_owned()]);
        if a.algorithms.is_empty() {
            c.report(
                at("algorithms"),
                format!("route `{}` accepts no algorithm", r.name),
                "empty allowlist",
                Some("list what your issuer signs with, e.g. [\"RS256\"]".to_owned()),
            );
        }
        for (j, alg) in a.algorithms.iter().enumerate() {
            if !ALGORITHMS.contains(&alg.as_str()) {
                let help = if alg.eq_ignore_ascii_case("none") {
                    "unsigned tokens are never accepted".to_owned()
                } else {
                    match did_you_mean(alg, &ALGORITHMS) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None => format!("supported: {}", ALGORITHMS.join(", ")),
                    }
                };
                c.report(
                    path(&[&"routes", &i, &"auth", &"algorithms", &j]),
                    format!("`{alg}` is not a supported JWT algorithm"),
                    "unknown algorithm",
                    Some(help),
                );
            }
        }
        let has_secret = a.hs256_secret.is_some() || a.hs256_secret_env.is_some();
        let remote = a.discovery || a.jwks_url.is_some();
        if !remote && a.key_files.is_empty() && !has_secret {
            c.report(
                path(&[&"routes", &i, &"auth"]),
                format!("route `{}` has no keys to verify tokens with", r.name),
                "no key source",
                Some(
                    "set discovery = true with an issuer, a jwks_url, key_files, or (for development) hs256_secret_env"
                        .to_owned(),
                ),
            );
        }
        if remote && (!a.key_files.is_empty() || has_secret) {
            c.report(
                at("key_files"),
                "remote keys (discovery/jwks_url) cannot be mixed with local keys".to_owned(),
                "two key sources",
                Some("use one source per route".to_owned()),
            );
        }
        if a.discovery && a.issuer.is_none() {
            c.report(
                at("discovery"),
                "OIDC discovery needs the issuer URL".to_owned(),
                "no issuer",
                Some("set issuer = \"https://your-idp.example.com\"".to_owned()),
            );
        }
        if let Some(url) = &a.jwks_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            c.report(
                at("jwks_url"),
                format!("`{url}` is not an http(s) URL"),
                "not a URL",
                None,
            );
        }
        let hs = a.algorithms.iter().any(|x| x == "HS256");
        if hs && !has_secret {
            c.report(
                at("algorithms"),
                "HS256 is accepted but no shared secret is configured".to_owned(),
                "HS256 without a secret",
                Some("set hs256_secret_env (or remove HS256)".to_owned()),
            );
        }
        if has_secret && !hs {
            c.report(
                at(if a.hs256_secret.is_some() {
                    "hs256_secret"
                } else {
                    "hs256_secret_env"
                }),
                "a shared secret is set but HS256 is not in algorithms".to_owned(),
                "unused secret",
                Some("add \"HS256\" to algorithms, or remove the secret".to_owned()),
            );
        }
    }
}

fn check_cache(c: &mut Checker, config: &Config) {
    if config.cache.memory_size.as_u64() < 1 << 20 {
        c.report(
            path(&[&"cache", &"memory_size"]),
            format!("cache memory of {} is too small", config.cache.memory_size),
            "below 1 MiB",
            Some("give the memory tier at least \"1 MiB\" (e.g. \"256 MiB\")".to_owned()),
        );
    }
    if config.cache.disk_dir.is_some() && config.cache.disk_size.as_u64() < 1 << 20 {
        c.report(
            path(&[&"cache", &"disk_size"]),
            format!("cache disk size of {} is too small", config.cache.disk_size),
            "below 1 MiB",
            Some("give the disk tier at least \"1 MiB\", or remove disk_dir".to_owned()),
        );
    }
    for (i, r) in config.routes.iter().enumerate() {
        let Some(rc) = &r.cache else { continue };
        for (j, h) in rc.key.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                c.report(
                    path(&[&"routes", &i, &"cache", &"key", &"headers", &j]),
                    format!("`{h}` is not a header name"),
                    "invalid header name",
                    Some("header names are tokens such as \"accept-language\"".to_owned()),
                );
            }
        }
        for (j, q) in rc.key.ignore_query.iter().enumerate() {
            if q.is_empty() || q == "*" || q.contains(['&', '=']) {
                c.report(
                    path(&[&"routes", &i, &"cache", &"key", &"ignore_query", &j]),
                    format!("`{q}` is not a query parameter name"),
                    "invalid parameter",
                    Some("name a parameter (\"fbclid\") or a prefix (\"utm_*\")".to_owned()),
                );
            }
        }
        if rc.max_object_size.as_u64() == 0 {
            c.report(
                path(&[&"routes", &i, &"cache", &"max_object_size"]),
                "a cached route needs a maximum object size above 0".to_owned(),
                "zero",
                Some("e.g. \"8 MiB\"; set enabled = false to stop caching".to_owned()),
            );
        }
        if rc.lock_timeout.is_zero() {
            c.report(
                path(&[&"routes", &i, &"cache", &"lock_timeout"]),
                "lock_timeout of 0 would send every concurrent miss to the origin".to_owned(),
                "zero",
                Some("e.g. \"5s\" (how long misses wait for the first fetch)".to_owned()),
            );
        }
    }
}

fn check_server(c: &mut Checker, config: &Config) {
    let s = &config.server;
    if s.max_header_bytes.as_u64() < 8 * 1024 {
        c.report(
            path(&[&"server", &"max_header_bytes"]),
            format!(
                "max_header_bytes {} is below the 8 KiB minimum",
                s.max_header_bytes
            ),
            "too small",
            Some(
                "request heads need at least \"8 KiB\"; browsers send 1-4 KiB plus cookies"
                    .to_owned(),
            ),
        );
    }
    if s.max_headers == 0 || s.max_connections == 0 {
        let key = if s.max_headers == 0 {
            "max_headers"
        } else {
            "max_connections"
        };
        c.report(
            path(&[&"server", &key]),
            format!("{key} must be at least 1"),
            "zero",
            None,
        );
    }
    for (key, value, example) in [
        ("header_read_timeout", s.header_read_timeout, "10s"),
        ("send_timeout", s.send_timeout, "60s"),
        ("tunnel_idle_timeout", s.tunnel_idle_timeout, "5m"),
    ] {
        if value.is_zero() {
            c.report(
                path(&[&"server", &key]),
                format!("{key} must be positive"),
                "zero",
                Some(format!("e.g. \"{example}\"")),
            );
        }
    }
}

fn check_listeners(c: &mut Checker, config: &Config) {
    if config.listeners.is_empty() {
        c.report(
            Vec::new(),
            "no listeners configured".to_owned(),
            "",
            Some("add a [[listeners]] table with `addr = \"0.0.0.0:8080\"`".to_owned()),
        );
    }
    let mut seen: Vec<(SocketAddr, Vec<PathSeg>)> = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let p = path(&[&"listeners", &i, &"addr"]);
        if let Some(a) = c.addr(p.clone(), &l.addr) {
            seen.push((a, p));
        }
        if let Some(tls) = &l.tls {
            for (key, file) in [("cert", &tls.cert), ("key", &tls.key)] {
                let full = config.base_dir.join(file);
                if !full.is_file() {
                    c.report(
                        path(&[&"listeners", &i, &"tls", &key]),
                        format!("TLS {key} file {} does not exist", full.display()),
                        "file not found",
                        Some("paths are relative to the config file's directory".to_owned()),
                    );
                }
            }
        }
    }
    let admin_path = path(&[&"admin", &"addr"]);
    // A blank token can never be sent (header values are trimmed), and an empty one means none.
    let token_blank = config
        .admin
        .token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty());
    if token_blank {
        c.report(
            path(&[&"admin", &"token"]),
            "the admin token is empty or blank".to_owned(),
            "blank",
            Some(
                "leave it out (no token: state-changing endpoints are off), or set a secret"
                    .to_owned(),
            ),
        );
    }
    // The token may come from the environment at start (`outpost serve` reads it first).
    let env_token = std::env::var("OUTPOST_ADMIN_TOKEN").is_ok_and(|t| !t.trim().is_empty());
    if let Some(admin) = c.addr(admin_path.clone(), &config.admin.addr) {
        if !admin.ip().is_loopback()
            && (config.admin.token.is_none() || token_blank)
            && config.admin.token_file.is_none()
            && !env_token
        {
            c.report(
                admin_path.clone(),
                format!("admin listener {admin} is reachable beyond loopback without a token"),
                "not loopback",
                Some(
                    "set [admin] token_file (or OUTPOST_ADMIN_TOKEN), or bind 127.0.0.1".to_owned(),
                ),
            );
        }
        seen.push((admin, admin_path));
    }
    for i in 0..seen.len() {
        for j in 0..i {
            let (a, _) = &seen[j];
            let (b, pb) = &seen[i];
            if a.port() != 0 && a.port() == b.port() && overlaps(a, b) {
                c.report(
                    pb.clone(),
                    format!("listener {b} overlaps {a}"),
                    "address already used",
                    Some(
                        "each listener (and the admin API) needs its own port, or disjoint IPs"
                            .to_owned(),
                    ),
                );
            }
        }
    }
}

fn overlaps(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

fn check_client_location(c: &mut Checker, config: &Config) {
    let cl = &config.client_location;
    for (key, value) in [
        ("lat_header", &cl.lat_header),
        ("lon_header", &cl.lon_header),
        ("country_header", &cl.country_header),
        ("region_header", &cl.region_header),
    ] {
        if http::HeaderName::from_bytes(value.as_bytes()).is_err() {
            c.report(
                path(&[&"client_location", &key]),
                format!("`{value}` is not a valid header name"),
                "invalid header name",
                Some("header names are tokens such as \"x-user-lat\"".to_owned()),
            );
        }
    }
    for (i, n) in cl.networks.iter().enumerate() {
        c.point(
            path(&[&"client_location", &"networks", &i, &"location"]),
            &n.location,
        );
        if let Some(country) = &n.country {
            check_country(
                c,
                path(&[&"client_location", &"networks", &i, &"country"]),
                country,
            );
        }
    }
}

fn check_country(c: &mut Checker, p: Vec<PathSeg>, country: &str) {
    if country.len() != 2 || !country.chars().all(|ch| ch.is_ascii_uppercase()) {
        c.report(
            p,
            format!("`{country}` is not an ISO 3166-1 alpha-2 country code"),
            "expected two capital letters",
            Some("e.g. \"JP\", \"US\", \"DE\"".to_owned()),
        );
    }
}

fn check_origins(c: &mut Checker, config: &Config) {
    for (name, group) in &config.origins {
        c.name(path(&[&"origins", name]), "origin name", name);
        if group.endpoints.is_empty() {
            c.report(
                path(&[&"origins", name]),
                format!("origin group `{name}` has no endpoints"),
                "no endpoints",
                Some(format!(
                    "add [[origins.{name}.endpoints]] with url, region and location"
                )),
            );
        }
        let mut urls: HashMap<&str, usize> = HashMap::new();
        for (i, e) in group.endpoints.iter().enumerate() {
            let p = path(&[&"origins", name, &"endpoints", &i, &"url"]);
            check_endpoint_url(c, p.clone(), &e.url);
            if let Some(first) = urls.insert(e.url.as_str(), i) {
                c.report(
                    p,
                    format!("endpoint {} is listed twice in `{name}`", e.url),
                    "duplicate",
                    Some(format!("it is already endpoint #{}", first + 1)),
                );
            }
            c.point(
                path(&[&"origins", name, &"endpoints", &i, &"location"]),
                &e.location,
            );
        }
        if let Some(h) = &group.health_check {
            if !h.path.starts_with('/') {
                c.report(
                    path(&[&"origins", name, &"health_check", &"path"]),
                    format!("health check path `{}` must start with '/'", h.path),
                    "not an absolute path",
                    Some("e.g. \"/healthz\"".to_owned()),
                );
            }
            for (key, v) in [
                ("healthy_threshold", h.healthy_threshold),
                ("unhealthy_threshold", h.unhealthy_threshold),
            ] {
                if v == 0 {
                    c.report(
                        path(&[&"origins", name, &"health_check", &key]),
                        format!("{key} must be at least 1"),
                        "zero",
                        None,
                    );
                }
            }
            if h.interval.is_zero() || h.timeout.is_zero() || h.timeout > h.interval {
                c.report(
                    path(&[&"origins", name, &"health_check", &"timeout"]),
                    "health check timeout must be positive and at most the interval".to_owned(),
                    "timeout vs interval",
                    Some("e.g. interval = \"5s\", timeout = \"2s\"".to_owned()),
                );
            }
        }
        for (key, d) in [
            ("connect_timeout", group.connect_timeout),
            ("response_timeout", group.response_timeout),
        ] {
            if d.is_zero() {
                c.report(
                    path(&[&"origins", name, &key]),
                    format!("{key} must be positive"),
                    "zero",
                    Some("e.g. \"2s\"".to_owned()),
                );
            }
        }
    }
}

fn check_endpoint_url(c: &mut Checker, p: Vec<PathSeg>, url: &str) {
    let help = Some(
        "write the endpoint as \"http://host:port\" or \"https://host:port\", with no path"
            .to_owned(),
    );
    let uri = match url.parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => {
            c.report(p, format!("`{url}` is not a URL: {e}"), "invalid URL", help);
            return;
        }
    };
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            c.report(
                p,
                format!("`{url}` has no http:// or https:// scheme"),
                "scheme",
                help,
            );
            return;
        }
    }
    let has_path = uri.path_and_query().is_some_and(|pq| pq.as_str() != "/");
    if uri.host().is_none() || has_path {
        c.report(
            p,
            format!("`{url}` must be scheme://host[:port] only"),
            "unexpected part",
            help,
        );
    }
}

fn check_routes(c: &mut Checker, config: &Config) {
    let origin_names: Vec<&str> = config.origins.keys().map(String::as_str).collect();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut matches: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, r) in config.routes.iter().enumerate() {
        c.name(path(&[&"routes", &i, &"name"]), "route name", &r.name);
        if let Some(first) = names.insert(r.name.as_str(), i) {
            c.report(
                path(&[&"routes", &i, &"name"]),
                format!("route name `{}` is used twice", r.name),
                "duplicate name",
                Some(format!(
                    "route names label metrics and must be unique; route #{} has it",
                    first + 1
                )),
            );
        }
        if !config.origins.contains_key(&r.origin) {
            let help = match did_you_mean(&r.origin, &origin_names) {
                Some(best) => format!("did you mean `{best}`?"),
                None if origin_names.is_empty() => {
                    "define it with an [origins.NAME] table".to_owned()
                }
                None => format!("defined origins: {}", origin_names.join(", ")),
            };
            c.report(
                path(&[&"routes", &i, &"origin"]),
                format!("route `{}` uses unknown origin `{}`", r.name, r.origin),
                "no such origin",
                Some(help),
            );
        }
        if let Some(w) = &r.write_origin
            && !config.origins.contains_key(w)
        {
            let help = match did_you_mean(w, &origin_names) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!("defined origins: {}", origin_names.join(", ")),
            };
            c.report(
                path(&[&"routes", &i, &"write_origin"]),
                format!("route `{}` sends writes to unknown origin `{w}`", r.name),
                "no such origin",
                Some(help),
            );
        }
        if let Some(o) = &r.outbox {
            let key_ok = o.order_key == "route"
                || o.order_key
                    .strip_prefix("header:")
                    .is_some_and(|h| http::header::HeaderName::from_bytes(h.as_bytes()).is_ok());
            if !key_ok {
                c.report(
                    path(&[&"routes", &i, &"outbox", &"order_key"]),
                    format!(
                        "order_key `{}` is not `route` or `header:<name>`",
                        o.order_key
                    ),
                    "unknown order key",
                    Some("e.g. \"route\" or \"header:x-store-id\"".to_owned()),
                );
            }
            if o.max_entries == 0 || o.max_bytes.as_u64() == 0 {
                c.report(
                    path(&[&"routes", &i, &"outbox"]),
                    "the outbox limits must be positive".to_owned(),
                    "zero limit",
                    Some(
                        "max_entries and max_bytes bound what waits; e.g. 100000 and \"1 GiB\""
                            .to_owned(),
                    ),
                );
            }
            if o.retry_initial.is_zero() || o.retry_initial > o.retry_max {
                c.report(
                    path(&[&"routes", &i, &"outbox", &"retry_initial"]),
                    "retry_initial must be positive and at most retry_max".to_owned(),
                    "bad backoff",
                    Some("e.g. retry_initial = \"1s\", retry_max = \"5m\"".to_owned()),
                );
            }
        }
        if !r.path_prefix.starts_with('/') {
            c.report(
                path(&[&"routes", &i, &"path_prefix"]),
                format!("path prefix `{}` must start with '/'", r.path_prefix),
                "not an absolute path",
                Some("e.g. \"/api\"".to_owned()),
            );
        }
        if let Some(host) = &r.host {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty()
                || bare.contains('*')
                || http::uri::Authority::try_from(bare).is_err()
            {
                c.report(
                    path(&[&"routes", &i, &"host"]),
                    format!("`{host}` is not a host name"),
                    "invalid host",
                    Some(
                        "use an exact name (\"shop.example.com\") or \"*.example.com\"".to_owned(),
                    ),
                );
            }
        }
        let key = (
            r.host.clone().unwrap_or_default().to_ascii_lowercase(),
            normalise_prefix(&r.path_prefix),
        );
        if let Some(first) = matches.insert(key, i) {
            c.report(
                path(&[&"routes", &i, &"path_prefix"]),
                format!(
                    "route `{}` matches the same host and prefix as route `{}`",
                    r.name, config.routes[first].name
                ),
                "duplicate match",
                Some(
                    "the second route could never be chosen; remove it or change its prefix"
                        .to_owned(),
                ),
            );
        }
    }
}

/// Trailing slashes do not change what a prefix matches on segment boundaries.
fn normalise_prefix(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn check_fleet(c: &mut Checker, config: &Config) {
    if config.state.max_value_size.as_u64() == 0 {
        c.report(
            path(&[&"state", &"max_value_size"]),
            "max_value_size must be positive".to_owned(),
            "zero",
            Some("e.g. \"1 MiB\"".to_owned()),
        );
    }
    if config.state.sweep_interval.is_zero() {
        c.report(
            path(&[&"state", &"sweep_interval"]),
            "sweep_interval must be positive".to_owned(),
            "zero",
            Some("e.g. \"30s\"".to_owned()),
        );
    }
    let Some(f) = &config.fleet else { return };
    for url in f.nats.split(',').map(str::trim) {
        let ok = url.split_once("://").is_some_and(|(scheme, rest)| {
            matches!(scheme, "nats" | "tls" | "ws" | "wss") && !rest.is_empty()
        });
        if !ok {
            c.report(
                path(&[&"fleet", &"nats"]),
                format!("`{url}` is not a NATS server URL"),
                "expected nats://host:port",
                Some("e.g. \"nats://127.0.0.1:4222\" or \"tls://nats.example.com:4222\"; separate several with commas".to_owned()),
            );
        }
    }
    if f.credentials_file.is_some() && f.token_file.is_some() {
        c.report(
            path(&[&"fleet", &"token_file"]),
            "both credentials_file and token_file are set".to_owned(),
            "pick one",
            Some(
                "NATS authenticates a connection one way; keep the one your server expects"
                    .to_owned(),
            ),
        );
    }
    if let Some(t) = &f.tls
        && t.client_cert.is_some() != t.client_key.is_some()
    {
        c.report(
            path(&[&"fleet", &"tls"]),
            "client_cert and client_key go together".to_owned(),
            "half a client identity",
            Some("set both (PEM certificate and its private key) or neither".to_owned()),
        );
    }
    if !(1..=5).contains(&f.stream_replicas) {
        c.report(
            path(&[&"fleet", &"stream_replicas"]),
            format!("stream_replicas = {} is out of range", f.stream_replicas),
            "1 to 5",
            Some("JetStream keeps 1 to 5 copies; use 3 on a 3-server cluster".to_owned()),
        );
    }
    if f.heartbeat_interval < std::time::Duration::from_millis(100)
        || f.health_window < std::time::Duration::from_secs(1)
        || f.health_window > std::time::Duration::from_secs(600)
    {
        c.report(
            path(&[&"fleet", &"health_window"]),
            "heartbeat_interval must be at least 100ms and health_window 1s to 10m".to_owned(),
            "out of range",
            Some("the defaults are heartbeat_interval = \"5s\", health_window = \"5m\"".to_owned()),
        );
    }
    if !(0.0..=1.0).contains(&f.unhealthy_error_rate) {
        c.report(
            path(&[&"fleet", &"unhealthy_error_rate"]),
            format!(
                "unhealthy_error_rate = {} is not a fraction",
                f.unhealthy_error_rate
            ),
            "0 to 1",
            Some("0.01 means 1 % of answers are 5xx".to_owned()),
        );
    }
    if f.snapshot_interval < std::time::Duration::from_secs(1) {
        c.report(
            path(&[&"fleet", &"snapshot_interval"]),
            "snapshot_interval is shorter than a second".to_owned(),
            "too short",
            Some("snapshots re-send whole objects; \"30s\" is a good start".to_owned()),
        );
    }
}

fn check_analytics(c: &mut Checker, config: &Config) {
    use crate::model::SendVia;
    let a = &config.analytics;
    let p = |key: &str| path(&[&"analytics", &key]);
    if a.window < std::time::Duration::from_secs(1) {
        c.report(
            p("window"),
            "window is shorter than a second".to_owned(),
            "too short",
            Some("each window sends one summary to the center; \"60s\" is a good start".to_owned()),
        );
    }
    if a.retention < a.window.saturating_mul(2) {
        c.report(
            p("retention"),
            "retention must be at least two windows".to_owned(),
            "too short",
            Some(
                "raw events must outlive the window they are summarised in; e.g. \"24h\""
                    .to_owned(),
            ),
        );
    }
    if !(1..=1000).contains(&a.top_keys) {
        c.report(
            p("top_keys"),
            format!("top_keys = {} is out of range", a.top_keys),
            "1 to 1000",
            Some("summaries list this many keys per event type; 50 keeps them small".to_owned()),
        );
    }
    if a.max_batch_bytes.as_u64() == 0 {
        c.report(
            p("max_batch_bytes"),
            "max_batch_bytes must be positive".to_owned(),
            "zero",
            Some("e.g. \"1 MiB\"".to_owned()),
        );
    }
    if let Some(url) = &a.center_url {
        let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        });
        if !ok {
            c.report(
                p("center_url"),
                format!("`{url}` is not an HTTP(S) URL"),
                "expected http(s)://host[:port]/path",
                Some("e.g. \"https://central.example.com/analytics/summaries\"".to_owned()),
            );
        }
    }
    if !a.enabled {
        return;
    }
    let via_nats = match a.send_via {
        SendVia::Nats => true,
        SendVia::Http => false,
        SendVia::Auto => config.fleet.is_some(),
    };
    if via_nats && config.fleet.is_none() {
        c.report(
            p("send_via"),
            "send_via = \"nats\" needs a [fleet] section".to_owned(),
            "no fleet",
            Some("add [fleet] nats = \"nats://…\", or send over HTTP with center_url".to_owned()),
        );
    }
    if !via_nats && a.center_url.is_none() {
        c.report(
            p("enabled"),
            "analytics are enabled but summaries have nowhere to go".to_owned(),
            "no center_url",
            Some(
                "set center_url = \"https://…/analytics/summaries\", or join a fleet with [fleet]"
                    .to_owned(),
            ),
        );
    }
}
