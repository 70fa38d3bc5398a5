//! Cache keys: which stored responses a request could be answered with.
//!
//! The *primary key* is the host, path and normalised query, plus the request headers and
//! cookies a route names. The *secondary key* is what the stored response's `Vary` names
//! (RFC 9111 §4.1): several variants can live under one primary key.

use std::sync::Arc;

use http::HeaderMap;
use http::header::{COOKIE, HeaderName};

/// What, besides host, path and query, forms a route's keys.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    /// Request headers whose values join the key.
    pub headers: Vec<HeaderName>,
    /// Cookies whose values join the key.
    pub cookies: Vec<String>,
    /// Query parameter names left out (`utm_*` matches a prefix).
    pub ignore_query: Vec<String>,
    /// Sort parameters by name (stable, so repeated names keep their order).
    pub sort_query: bool,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy {
            headers: Vec::new(),
            cookies: Vec::new(),
            ignore_query: Vec::new(),
            sort_query: true,
        }
    }
}

/// A request's primary key. One string holds `host + path[?query] + extras`; the URL part is
/// what purges and invalidations match on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    full: Arc<str>,
    host_len: usize,
    url_len: usize,
}

impl CacheKey {
    /// Builds the key of a request for `host` (as the client sent it) and `path_and_query`.
    pub fn new(policy: &KeyPolicy, host: &str, path_and_query: &str, headers: &HeaderMap) -> Self {
        let mut s = url_key(policy, host, path_and_query);
        let host_len = host_part(&s).len();
        let url_len = s.len();
        for name in &policy.headers {
            s.push_str("\n h:");
            s.push_str(name.as_str());
            s.push('=');
            s.push_str(&normalised_value(headers, name).unwrap_or_default());
        }
        for cookie in &policy.cookies {
            s.push_str("\n c:");
            s.push_str(cookie);
            s.push('=');
            if let Some(v) = cookie_value(headers, cookie) {
                s.push_str(v);
            }
        }
        CacheKey {
            full: s.into(),
            host_len,
            url_len,
        }
    }

    /// Rebuilds a key from its stored string (disk tier).
    pub fn from_stored(full: &str) -> Self {
        let url_len = full.find("\n ").unwrap_or(full.len());
        CacheKey {
            host_len: host_part(&full[..url_len]).len(),
            url_len,
            full: full.into(),
        }
    }

    /// The whole key.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The shared string, for indexes.
    pub fn shared(&self) -> Arc<str> {
        self.full.clone()
    }

    /// `host/path?query`, normalised: what URL purges and invalidations compare.
    pub fn url(&self) -> &str {
        &self.full[..self.url_len]
    }

    /// The host part of the URL (lowercase, port kept).
    pub fn host(&self) -> &str {
        &self.full[..self.host_len]
    }
}

fn host_part(url: &str) -> &str {
    url.find('/').map_or(url, |i| &url[..i])
}

/// `host/path?query` with the host lowercased and the query normalised by the policy.
pub fn url_key(policy: &KeyPolicy, host: &str, path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut s = String::with_capacity(host.len() + path_and_query.len());
    s.push_str(&host.to_ascii_lowercase());
    s.push_str(if path.is_empty() { "/" } else { path });
    if let Some(q) = query {
        let mut params: Vec<&str> = q
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| {
                let name = p.split_once('=').map_or(*p, |(n, _)| n);
                !policy
                    .ignore_query
                    .iter()
                    .any(|ig| match ig.strip_suffix('*') {
                        Some(prefix) => name.starts_with(prefix),
                        None => name == ig,
                    })
            })
            .collect();
        if policy.sort_query {
            params.sort_by_key(|p| p.split_once('=').map_or(*p, |(n, _)| n));
        }
        if !params.is_empty() {
            s.push('?');
            s.push_str(&params.join("&"));
        }
    }
    s
}

/// A header's lines joined with `, ` and whitespace around commas removed, so that
/// `gzip,br` and `gzip, br` select the same variant; `None` when absent.
pub fn normalised_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let v = String::from_utf8_lossy(v.as_bytes());
        for part in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let s = out.get_or_insert_with(String::new);
            if !s.is_empty() {
                s.push_str(", ");
            }
            s.push_str(part);
        }
        out.get_or_insert_with(String::new);
    }
    out
}

/// One cookie's value from the `Cookie` header(s).
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The request's values for the fields a response varies on: the secondary key.
pub fn secondary(names: &[HeaderName], headers: &HeaderMap) -> Vec<(HeaderName, Option<String>)> {
    names
        .iter()
        .map(|n| (n.clone(), normalised_value(headers, n)))
        .collect()
}

/// Whether a request selects a stored variant (RFC 9111 §4.1).
pub fn matches(stored: &[(HeaderName, Option<String>)], headers: &HeaderMap) -> bool {
    stored
        .iter()
        .all(|(name, value)| normalised_value(headers, name) == *value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn policy() -> KeyPolicy {
        KeyPolicy {
            ignore_query: vec!["utm_*".into(), "fbclid".into()],
            ..KeyPolicy::default()
        }
    }

    #[test]
    fn query_is_sorted_and_tracking_parameters_dropped() {
        let p = policy();
        assert_eq!(
            url_key(&p, "Shop.Example", "/a?b=2&utm_source=x&a=1&fbclid=z&a=0"),
            "shop.example/a?a=1&a=0&b=2"
        );
        assert_eq!(url_key(&p, "h", "/a?utm_x=1"), "h/a");
        assert_eq!(url_key(&p, "h", "/a?"), "h/a");
        let unsorted = KeyPolicy {
            sort_query: false,
            ..KeyPolicy::default()
        };
        assert_eq!(url_key(&unsorted, "h", "/a?b=1&a=2"), "h/a?b=1&a=2");
    }

    #[test]
    fn headers_and_cookies_join_the_key_and_the_url_stays_separate() {
        let p = KeyPolicy {
            headers: vec![HeaderName::from_static("x-device")],
            cookies: vec!["ab".into()],
            ..KeyPolicy::default()
        };
        let mut h = HeaderMap::new();
        h.insert("x-device", HeaderValue::from_static("mobile"));
        h.insert(COOKIE, HeaderValue::from_static("session=s1; ab=B"));
        let k = CacheKey::new(&p, "h:8080", "/p?z=1", &h);
        assert_eq!(k.url(), "h:8080/p?z=1");
        assert_eq!(k.host(), "h:8080");
        assert_eq!(k.as_str(), "h:8080/p?z=1\n h:x-device=mobile\n c:ab=B");
        assert_eq!(CacheKey::from_stored(k.as_str()), k);
        let mut other = h.clone();
        other.insert(COOKIE, HeaderValue::from_static("session=s2; ab=B"));
        assert_eq!(CacheKey::new(&p, "h:8080", "/p?z=1", &other), k);
        other.insert(COOKIE, HeaderValue::from_static("ab=A"));
        assert_ne!(CacheKey::new(&p, "h:8080", "/p?z=1", &other), k);
    }

    #[test]
    fn vary_matching_normalises_whitespace_and_absence() {
        let names = [HeaderName::from_static("accept-encoding")];
        let mut a = HeaderMap::new();
        a.insert("accept-encoding", HeaderValue::from_static("gzip,br"));
        let stored = secondary(&names, &a);
        let mut b = HeaderMap::new();
        b.append("accept-encoding", HeaderValue::from_static("gzip"));
        b.append("accept-encoding", HeaderValue::from_static(" br"));
        assert!(matches(&stored, &b));
        assert!(!matches(&stored, &HeaderMap::new()));
        let absent = secondary(&names, &HeaderMap::new());
        assert!(matches(&absent, &HeaderMap::new()));
        assert!(!matches(&absent, &a));
    }

    proptest! {
        /// Any order of the same parameters gives the same key.
        #[test]
        fn key_is_independent_of_parameter_order(
            mut params in proptest::collection::vec(("[a-c]{1,2}", "[0-9]{0,2}"), 0..6)
        ) {
            params.sort_by(|a, b| a.0.cmp(&b.0));
            params.dedup_by(|a, b| a.0 == b.0);
            let q: Vec<String> = params.iter().map(|(n, v)| format!("{n}={v}")).collect();
            let mut rev = q.clone();
            rev.reverse();
            let p = KeyPolicy::default();
            prop_assert_eq!(
                url_key(&p, "h", &format!("/x?{}", q.join("&"))),
                url_key(&p, "h", &format!("/x?{}", rev.join("&")))
            );
        }
    }
}
