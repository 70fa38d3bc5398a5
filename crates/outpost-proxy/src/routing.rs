//! Route matching: host (exact beats wildcard beats any), then the longest path prefix on a
//! segment boundary (`/api` matches `/api` and `/api/x`, never `/apix`).
//!
//! On the request path this runs right after the context stage; the result names the route
//! whose guards, handler and origin group apply.

/// How a route matches the request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
    Exact(String),
}

impl HostMatch {
    fn parse(host: Option<&str>) -> HostMatch {
        match host {
            None => HostMatch::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }

    /// Higher is more specific; longer wildcard suffixes beat shorter ones.
    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Any => (0, 0),
            HostMatch::Suffix(s) => (1, s.len()),
            HostMatch::Exact(_) => (2, 0),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    host: HostMatch,
    /// Without trailing slash, except the root `/`.
    prefix: String,
    index: usize,
}

/// The compiled routing table; routes are referred to by their index in the config.
#[derive(Debug, Clone)]
pub struct RouteTable {
    entries: Vec<Entry>,
}

impl RouteTable {
    /// Compiles `(host, path_prefix)` pairs in config order.
    pub fn new<'a>(routes: impl IntoIterator<Item = (Option<&'a str>, &'a str)>) -> RouteTable {
        let mut entries: Vec<Entry> = routes
            .into_iter()
            .enumerate()
            .map(|(index, (host, prefix))| Entry {
                host: HostMatch::parse(host),
                prefix: normalise(prefix),
                index,
            })
            .collect();
        entries.sort_by(|a, b| {
            b.host
                .rank()
                .cmp(&a.host.rank())
                .then(b.prefix.len().cmp(&a.prefix.len()))
                .then(a.index.cmp(&b.index))
        });
        RouteTable { entries }
    }

    /// Finds the route for a host (any case, port allowed) and path.
    pub fn find(&self, host: &str, path: &str) -> Option<usize> {
        let host = strip_port(host);
        let host_lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host_lower = host.to_ascii_lowercase();
            host_lower.as_str()
        } else {
            host
        };
        self.entries
            .iter()
            .find(|e| e.host.matches(host) && prefix_matches(&e.prefix, path))
            .map(|e| e.index)
    }
}

fn normalise(prefix: &str) -> String {
    let t = prefix.trim_end_matches('/');
    if t.is_empty() {
        "/".to_owned()
    } else {
        t.to_owned()
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port keeps the brackets; a malformed `[v6` without `]` stays as it is.
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Removes a matched prefix from a path, keeping it absolute (`/api/x` → `/x`, `/api` → `/`).
pub fn strip_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table() -> RouteTable {
        RouteTable::new([
            (None, "/"),
            (None, "/api"),
            (None, "/api/v2/"),
            (Some("*.example.com"), "/"),
            (Some("shop.example.com"), "/"),
            (Some("*.eu.example.com"), "/"),
        ])
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        assert_eq!(t.find("localhost", "/api"), Some(1));
        assert_eq!(t.find("localhost", "/api/x"), Some(1));
        assert_eq!(t.find("localhost", "/apix"), Some(0));
        assert_eq!(t.find("localhost", "/api/v2"), Some(2));
        assert_eq!(t.find("localhost", "/api/v2/items"), Some(2));
        assert_eq!(t.find("localhost:8080", "/other"), Some(0));
    }

    #[test]
    fn exact_host_beats_longer_wildcard_beats_shorter_wildcard() {
        let t = table();
        assert_eq!(t.find("shop.example.com", "/api"), Some(4));
        assert_eq!(t.find("SHOP.Example.com:443", "/"), Some(4));
        assert_eq!(t.find("a.eu.example.com", "/"), Some(5));
        assert_eq!(t.find("a.example.com", "/"), Some(3));
        assert_eq!(t.find("example.com", "/"), Some(0));
        assert_eq!(t.find("[::1]:8080", "/api"), Some(1));
    }

    #[test]
    fn no_route_when_nothing_matches() {
        let t = RouteTable::new([(Some("a.test"), "/x")]);
        assert_eq!(t.find("a.test", "/y"), None);
        assert_eq!(t.find("b.test", "/x"), None);
    }

    #[test]
    fn strip_prefix_keeps_paths_absolute() {
        assert_eq!(strip_prefix("/api", "/api/products"), "/products");
        assert_eq!(strip_prefix("/api/", "/api/products"), "/products");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/", "/x"), "/x");
    }

    proptest! {
        #[test]
        fn a_found_route_really_matches(host in "[a-zA-Z.:\\[\\]0-9]{0,30}", path in "/[a-z/]{0,20}") {
            let t = table();
            if let Some(i) = t.find(&host, &path) {
                let prefixes = ["/", "/api", "/api/v2", "/", "/", "/"];
                prop_assert!(prefix_matches(prefixes[i], &path));
            }
            prop_assert!(strip_prefix("/api", &path).starts_with('/'));
        }
    }
}
