//! `Cache-Control` parsing (RFC 9111 §5.2) for requests and responses, and HTTP dates.
//!
//! Parsing is lenient where the RFC asks recipients to be (quoted delta-seconds, any letter
//! case, repeated header lines) and strict where a mistake would make a stale response look
//! fresh: an invalid `max-age` counts as `max-age=0`, an invalid `Expires` as a time in the past.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::{CACHE_CONTROL, HeaderName};

/// RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31.
const DELTA_MAX: u64 = 1 << 31;

/// One `name[=value]` directive, name lowercased, value unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Directive name in lower case.
    pub name: String,
    /// Argument, with surrounding quotes and escapes removed.
    pub value: Option<String>,
}

/// Splits every `Cache-Control` line of `headers` into directives, in order.
///
/// Commas inside quoted strings (`private="a, b"`) do not split. Empty list elements are skipped.
pub fn parse(headers: &HeaderMap, name: &HeaderName) -> Vec<Directive> {
    let mut out = Vec::new();
    for line in headers.get_all(name) {
        let Ok(line) = std::str::from_utf8(line.as_bytes()) else {
            continue;
        };
        parse_line(line, &mut out);
    }
    out
}

fn parse_line(line: &str, out: &mut Vec<Directive>) {
    let mut rest = line;
    while !rest.is_empty() {
        // One list element: up to the next comma that is not inside quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                ',' if !in_quotes => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let element = rest[..end].trim();
        rest = if end < rest.len() {
            &rest[end + 1..]
        } else {
            ""
        };
        if element.is_empty() {
            continue;
        }
        let (name, value) = match element.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
            None => (element, None),
        };
        if name.is_empty() {
            continue;
        }
        out.push(Directive {
            name: name.to_ascii_lowercase(),
            value,
        });
    }
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return v.to_owned();
    };
    let mut s = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                s.push(n);
            }
        } else {
            s.push(c);
        }
    }
    s
}

/// Parses delta-seconds (`1*DIGIT`); `None` when it is not a number. Overflow saturates at 2^31.
pub fn delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().map_or(DELTA_MAX, |n| n.min(DELTA_MAX)))
}

/// A field-name list argument (`private="set-cookie, x-a"`), lowercased.
fn field_names(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// How a response's `private` directive restricts a shared cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Private {
    /// No `private` directive.
    #[default]
    No,
    /// Unqualified `private`: a shared cache must not store the response.
    All,
    /// `private="a, b"`: the listed fields must not be stored; the rest may be.
    Fields(Vec<String>),
}

/// The response directives a shared cache acts on (RFC 9111 §5.2.2, RFC 5861).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDirectives {
    /// `max-age`; an invalid value is recorded as 0 (stale).
    pub max_age: Option<u64>,
    /// `s-maxage`, which overrides `max-age` in a shared cache; invalid → 0.
    pub s_maxage: Option<u64>,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` in either form; the qualified form is treated as unqualified (RFC 9111
    /// §5.2.2.4 allows it), so the response is always revalidated before reuse.
    pub no_cache: bool,
    /// `private`.
    pub private: Private,
    /// `public`: storable even with `Authorization`, and heuristically cacheable.
    pub public: bool,
    /// `must-revalidate`: never served stale.
    pub must_revalidate: bool,
    /// `proxy-revalidate`: `must-revalidate` for shared caches.
    pub proxy_revalidate: bool,
    /// `must-understand`: store only if the status code is understood, then ignore `no-store`.
    pub must_understand: bool,
    /// RFC 5861 `stale-while-revalidate` seconds.
    pub stale_while_revalidate: Option<u64>,
    /// RFC 5861 `stale-if-error` seconds.
    pub stale_if_error: Option<u64>,
}

impl ResponseDirectives {
    /// Reads the directives of a response's header section; the first occurrence of a
    /// repeated directive wins (RFC 9111 §4.2.1).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut d = ResponseDirectives::default();
        let mut seen_max_age = false;
        let mut seen_s_maxage = false;
        for Directive { name, value } in parse(headers, &CACHE_CONTROL) {
            let v = value.as_deref();
            match name.as_str() {
                "max-age" if !seen_max_age => {
                    seen_max_age = true;
                    d.max_age = Some(v.and_then(delta_seconds).unwrap_or(0));
                }
                "s-maxage" if !seen_s_maxage => {
                    seen_s_maxage = true;
                    d.s_maxage = Some(v.and_then(delta_seconds).unwrap_or(0));
                }
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => {
                    d.private = match (v, &d.private) {
                        (_, Private::All) | (None, _) => Private::All,
                        (Some(list), Private::Fields(prev)) => {
                            let mut all = prev.clone();
                            all.extend(field_names(list));
                            Private::Fields(all)
                        }
                        (Some(list), Private::No) => {
                            let names = field_names(list);
                            if names.is_empty() {
                                Private::All
                            } else {
                                Private::Fields(names)
                            }
                        }
                    }
                }
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "must-understand" => d.must_understand = true,
                "stale-while-revalidate" if d.stale_while_revalidate.is_none() => {
                    d.stale_while_revalidate = v.and_then(delta_seconds);
                }
                "stale-if-error" if d.stale_if_error.is_none() => {
                    d.stale_if_error = v.and_then(delta_seconds);
                }
                _ => {}
            }
        }
        d
    }
}

/// `max-stale` with or without a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxStale {
    /// `max-stale` alone: any staleness is acceptable to the client.
    Any,
    /// `max-stale=N`.
    Seconds(u64),
}

/// The request directives a shared cache honours (RFC 9111 §5.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `max-age=N`: the client wants a response at most N seconds old.
    pub max_age: Option<u64>,
    /// `max-stale[=N]`: the client accepts a stale response.
    pub max_stale: Option<MaxStale>,
    /// `min-fresh=N`: the client wants at least N more seconds of freshness.
    pub min_fresh: Option<u64>,
    /// `no-cache`: validate with the origin before using a stored response.
    pub no_cache: bool,
    /// `no-store`: do not store this request's response.
    pub no_store: bool,
    /// `only-if-cached`: answer from the cache or with 504, never contact the origin.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// Reads the directives of a request's header section; invalid values are ignored.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        if !headers.contains_key(CACHE_CONTROL) {
            return d;
        }
        for Directive { name, value } in parse(headers, &CACHE_CONTROL) {
            let v = value.as_deref();
            match name.as_str() {
                "max-age" if d.max_age.is_none() => d.max_age = v.and_then(delta_seconds),
                "max-stale" if d.max_stale.is_none() => {
                    d.max_stale = match v {
                        None => Some(MaxStale::Any),
                        Some(v) => delta_seconds(v).map(MaxStale::Seconds),
                    }
                }
                "min-fresh" if d.min_fresh.is_none() => d.min_fresh = v.and_then(delta_seconds),
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        }
        d
    }
}

/// Parses an HTTP-date in any of the three formats of RFC 9110 §5.6.7.
pub fn http_date(v: &http::HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?.trim()).ok()
}

/// Formats a time as an IMF-fixdate.
pub fn fmt_http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Whole seconds between two times (rounded down, as HTTP's one-second resolution asks), 0
/// when `later` is earlier.
pub fn secs_between(earlier: SystemTime, later: SystemTime) -> Duration {
    Duration::from_secs(later.duration_since(earlier).map_or(0, |d| d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn resp(cc: &[&str]) -> ResponseDirectives {
        let mut h = HeaderMap::new();
        for v in cc {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).expect("valid"));
        }
        ResponseDirectives::from_headers(&h)
    }

    fn req(cc: &str) -> RequestDirectives {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_str(cc).expect("valid"));
        RequestDirectives::from_headers(&h)
    }

    #[test]
    fn reads_each_response_directive() {
        let d = resp(&[
            "Public, MAX-AGE=60, s-maxage=\"30\", must-revalidate",
            "proxy-revalidate, stale-while-revalidate=10, stale-if-error=600, must-understand",
        ]);
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(30));
        assert!(d.public && d.must_revalidate && d.proxy_revalidate && d.must_understand);
        assert_eq!(d.stale_while_revalidate, Some(10));
        assert_eq!(d.stale_if_error, Some(600));
        assert!(!d.no_store && !d.no_cache);
    }

    #[test]
    fn invalid_max_age_means_stale_and_first_occurrence_wins() {
        assert_eq!(resp(&["max-age=abc"]).max_age, Some(0));
        assert_eq!(resp(&["max-age=-1"]).max_age, Some(0));
        assert_eq!(resp(&["max-age"]).max_age, Some(0));
        assert_eq!(resp(&["max-age=10, max-age=100"]).max_age, Some(10));
        assert_eq!(resp(&["max-age=10", "max-age=100"]).max_age, Some(10));
        assert_eq!(
            resp(&["max-age=99999999999999999999"]).max_age,
            Some(DELTA_MAX)
        );
    }

    #[test]
    fn private_qualified_keeps_field_names_and_quoted_commas() {
        assert_eq!(resp(&["private"]).private, Private::All);
        assert_eq!(
            resp(&["private=\"Set-Cookie, X-Secret\", max-age=5"]).private,
            Private::Fields(vec!["set-cookie".into(), "x-secret".into()])
        );
        assert_eq!(resp(&["private=\"x\", private"]).private, Private::All);
        assert_eq!(resp(&["private=\"a, b\", max-age=5"]).max_age, Some(5));
        assert!(resp(&["no-cache=\"set-cookie\""]).no_cache);
    }

    #[test]
    fn reads_request_directives() {
        let d = req("max-age=5, max-stale, min-fresh=2, no-cache, no-store, only-if-cached");
        assert_eq!(d.max_age, Some(5));
        assert_eq!(d.max_stale, Some(MaxStale::Any));
        assert_eq!(d.min_fresh, Some(2));
        assert!(d.no_cache && d.no_store && d.only_if_cached);
        assert_eq!(req("max-stale=30").max_stale, Some(MaxStale::Seconds(30)));
        assert_eq!(req("max-stale=x").max_stale, None);
    }

    #[test]
    fn parses_all_three_date_formats() {
        let want = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").ok();
        for v in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(http_date(&HeaderValue::from_static(v)), want, "{v}");
        }
        assert_eq!(http_date(&HeaderValue::from_static("0")), None);
    }

    proptest! {
        /// Cache-Control comes from the origin (and clients); any bytes parse without panicking.
        #[test]
        fn any_cache_control_parses(s in "[ -~]{0,80}") {
            if let Ok(v) = HeaderValue::from_str(&s) {
                let mut h = HeaderMap::new();
                h.insert(CACHE_CONTROL, v);
                let _ = ResponseDirectives::from_headers(&h);
                let _ = RequestDirectives::from_headers(&h);
            }
        }

        /// A plain list of valid max-age values always yields the first.
        #[test]
        fn first_max_age_wins(a in 0u64..1_000_000, b in 0u64..1_000_000) {
            let d = resp(&[&format!("max-age={a}, max-age={b}")]);
            prop_assert_eq!(d.max_age, Some(a));
        }
    }
}
