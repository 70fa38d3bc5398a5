//! `Cache-Control` parsing (RFC 9111 §5.2) for requests and responses, the CDN-targeted
//! fields of RFC 9213 (`CDN-Cache-Control`), and HTTP dates.
//!
//! Parsing is lenient where the RFC asks recipients to be (quoted delta-seconds, any letter
//! case, repeated header lines) and strict where a mistake would make a stale response look
//! fresh: an invalid `max-age` counts as `max-age=0`, an invalid `Expires` as a time in the past.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::{CACHE_CONTROL, HeaderName};

/// RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31.
const DELTA_MAX: u64 = 1 << 31;

/// The targeted cache-control fields this cache obeys (RFC 9213), most specific first: one
/// for Outpost alone, then the one for every CDN. The first with a valid, non-empty value
/// replaces `Cache-Control` and `Expires` for storing and freshness; all are forwarded.
pub const TARGETED_FIELDS: [HeaderName; 2] = [
    HeaderName::from_static("outpost-cdn-cache-control"),
    HeaderName::from_static("cdn-cache-control"),
];

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
        // No whitespace around `=` (RFC 9111 §5.2): `max-age =60` is not `max-age`, and
        // `max-age= 60` is an invalid `max-age`.
        let (name, value) = match element.split_once('=') {
            Some((n, v)) => (n, Some(unquote(v))),
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
    /// The directives come from a targeted field ([`TARGETED_FIELDS`]): `Expires` is ignored.
    pub targeted: bool,
}

impl ResponseDirectives {
    /// Reads the directives a shared cache obeys: those of the first targeted field with a
    /// valid, non-empty value (RFC 9213 §2.1), or else `Cache-Control`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        TARGETED_FIELDS
            .iter()
            .find_map(|name| Self::from_targeted(headers, name))
            .unwrap_or_else(|| Self::from_cache_control(headers))
    }

    /// A targeted field's directives, `None` when it is absent, empty or not a valid
    /// Structured Field Dictionary (RFC 9213 §2.1: then it is ignored as a whole). A directive
    /// whose value has the wrong type is ignored; `max-age=-1` is invalid, hence stale.
    fn from_targeted(headers: &HeaderMap, name: &HeaderName) -> Option<Self> {
        let mut lines = headers.get_all(name).iter();
        let first = lines.next()?;
        // Field lines combine with commas (RFC 9110 §5.3), as Structured Fields expect.
        let mut joined = first.as_bytes().to_vec();
        for line in lines {
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(line.as_bytes());
        }
        let dict: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
        if dict.is_empty() {
            return None;
        }
        let mut d = ResponseDirectives {
            targeted: true,
            ..ResponseDirectives::default()
        };
        for (key, member) in &dict {
            let sfv::ListEntry::Item(item) = member else {
                continue;
            };
            let bare = &item.bare_item;
            let seconds = || {
                bare.as_integer()
                    .map(|n| u64::try_from(i64::from(n)).map_or(0, |n| n.min(DELTA_MAX)))
            };
            let set = bare.as_boolean() == Some(true);
            let names = || bare.as_string().map(|s| field_names(s.as_str()));
            match key.as_str() {
                "max-age" => d.max_age = seconds(),
                "s-maxage" => d.s_maxage = seconds(),
                "stale-while-revalidate" => d.stale_while_revalidate = seconds(),
                "stale-if-error" => d.stale_if_error = seconds(),
                "no-store" => d.no_store = set,
                "no-cache" => d.no_cache = set || names().is_some(),
                "private" => {
                    d.private = match names() {
                        Some(n) if !n.is_empty() => Private::Fields(n),
                        Some(_) => Private::All,
                        None if set => Private::All,
                        None => Private::No,
                    }
                }
                "public" => d.public = set,
                "must-revalidate" => d.must_revalidate = set,
                "proxy-revalidate" => d.proxy_revalidate = set,
                "must-understand" => d.must_understand = set,
                _ => {}
            }
        }
        Some(d)
    }

    /// Reads `Cache-Control`; the first occurrence of a repeated directive wins (RFC 9111
    /// §4.2.1).
    fn from_cache_control(headers: &HeaderMap) -> Self {
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
///
/// Leniently, as RFC 9111 §4.2 asks of caches: day, month and zone names in any case, and the
/// weekday ignored (`httpdate` refuses both, and an origin's `Expires` with a wrong weekday
/// would then make a fresh answer stale).
pub fn http_date(v: &http::HeaderValue) -> Option<SystemTime> {
    let s = v.to_str().ok()?.trim();
    httpdate::parse_http_date(s)
        .ok()
        .or_else(|| lenient_http_date(s))
}

/// The three formats, exactly as RFC 9110 §5.6.7 spells them, except that day, month and zone
/// names may be in any case and the weekday is not checked against the date:
/// `Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT`,
/// `Sun Nov  6 08:49:37 1994`. Anything else (a missing comma, extra spaces, dashes with a
/// four-digit year) stays invalid, as the RFC requires.
fn lenient_http_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let (day, mon, year, time) = match s.split_once(',') {
        Some((weekday, rest)) => {
            let rest = rest.strip_prefix(' ')?.as_bytes();
            if !is_day_name(weekday) {
                return None;
            }
            match rest.len() {
                // IMF-fixdate: "06 Nov 1994 08:49:37 GMT"
                24 if rest[2] == b' ' && rest[6] == b' ' && rest[11] == b' ' => (
                    &rest[0..2],
                    &rest[3..6],
                    four_digit_year(&rest[7..11])?,
                    &rest[12..],
                ),
                // rfc850-date: "06-Nov-94 08:49:37 GMT"
                22 if rest[2] == b'-' && rest[6] == b'-' && rest[9] == b' ' => {
                    let yy = digits(&rest[7..9])?;
                    // RFC 9110: a two-digit year more than 50 years ahead is in the past
                    // century; as `httpdate` does, 70..=99 are 19xx.
                    let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
                    (&rest[0..2], &rest[3..6], year, &rest[10..])
                }
                _ => return None,
            }
        }
        // asctime-date: "Sun Nov  6 08:49:37 1994"
        None if b.len() == 24 && b[3] == b' ' && b[7] == b' ' && b[10] == b' ' && b[19] == b' ' => {
            if !std::str::from_utf8(&b[..3]).is_ok_and(is_day_name) {
                return None;
            }
            let day = if b[8] == b' ' { &b[9..10] } else { &b[8..10] };
            let year = four_digit_year(&b[20..24])?;
            let mut time = b[11..19].to_vec();
            time.extend_from_slice(b" GMT");
            return civil_time(day, &b[4..7], year, &time);
        }
        None => return None,
    };
    civil_time(day, mon, year, time)
}

/// `dd`, `Mon`, year and `hh:mm:ss GMT` as a time, checked.
fn civil_time(day: &[u8], mon: &[u8], year: u64, time: &[u8]) -> Option<SystemTime> {
    if time.len() != 12 || time[2] != b':' || time[5] != b':' || time[8] != b' ' {
        return None;
    }
    if !time[9..].eq_ignore_ascii_case(b"gmt") {
        return None;
    }
    let (h, m, sec) = (
        digits(&time[0..2])?,
        digits(&time[3..5])?,
        digits(&time[6..8])?,
    );
    let day = digits(day)?;
    let mon = month(mon)?;
    if !(1970..=9999).contains(&year) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day == 0 || day > month_days[usize::try_from(mon - 1).ok()?] {
        return None;
    }
    let days = days_from_civil(year, mon, day);
    // A leap second counts as the second before it.
    let secs = days * 86_400 + h * 3600 + m * 60 + sec.min(59);
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

fn four_digit_year(b: &[u8]) -> Option<u64> {
    (b.len() == 4).then(|| digits(b)).flatten()
}

/// A day name, short or long, in any case.
fn is_day_name(t: &str) -> bool {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    DAYS.iter()
        .any(|d| d.eq_ignore_ascii_case(t) || (t.len() == 3 && d[..3].eq_ignore_ascii_case(t)))
}

/// 1..=12 for a month's three-letter name in any case.
fn month(t: &[u8]) -> Option<u64> {
    const NAMES: [&[u8]; 12] = [
        b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov",
        b"dec",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(t))
        .map(|i| i as u64 + 1)
}

/// One to four ASCII digits (no sign, no spaces), as a number.
fn digits(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 4 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(t.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Days from 1970-01-01 to a date on or after it (H. Hinnant's civil calendar algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    fn date(s: &str) -> Option<SystemTime> {
        http_date(&HeaderValue::from_str(s).expect("value"))
    }

    #[test]
    fn dates_are_read_leniently_as_caches_should() {
        let want = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").ok();
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "Thu, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "sunday, 06-nov-94 08:49:37 Gmt",
            "Sun Nov  6 08:49:37 1994",
            "mon nov  6 08:49:37 1994",
        ] {
            assert_eq!(date(s), want, "{s}");
        }
        assert_eq!(
            date("Thu, 08 Aug 2050 00:00:00 GMT"),
            httpdate::parse_http_date("Mon, 08 Aug 2050 00:00:00 GMT").ok()
        );
        assert_eq!(
            date("Tue, 29 Feb 2000 23:59:59 GMT"),
            httpdate::parse_http_date("Tue, 29 Feb 2000 23:59:59 GMT").ok()
        );
        for bad in [
            "0",
            "",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Sun, 29 Feb 1900 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, +6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            // Structure stays strict (cache-tests' required "invalid Expires" cases).
            "06 Nov 1994 08:49:37 GMT",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "Sun, 06  Nov 1994 08:49:37 GMT",
            "Sun, 06-Nov-1994 08:49:37 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun,06 Nov 1994 08:49:37 GMT",
            "Son, 06 Nov 1994 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
        ] {
            assert_eq!(date(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_formatted_date_reads_back_in_any_case(
            secs in 0u64..253_402_300_799,
            upper in any::<bool>(),
        ) {
            let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            let s = fmt_http_date(t);
            let s = if upper { s.to_ascii_uppercase() } else { s.to_ascii_lowercase() };
            prop_assert_eq!(lenient_http_date(&s), Some(t));
        }

        #[test]
        fn the_lenient_reader_never_panics(s in "\\PC{0,40}") {
            let _ = lenient_http_date(&s);
        }
    }

    fn resp(cc: &[&str]) -> ResponseDirectives {
        let mut h = HeaderMap::new();
        for v in cc {
            h.append(CACHE_CONTROL, HeaderValue::from_str(v).expect("valid"));
        }
        ResponseDirectives::from_headers(&h)
    }

    fn with_targeted(fields: &[(&'static str, &str)]) -> ResponseDirectives {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_str(v).expect("valid"));
        }
        ResponseDirectives::from_headers(&h)
    }

    #[test]
    fn a_valid_cdn_cache_control_replaces_cache_control() {
        let d = with_targeted(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=600, stale-if-error=30"),
        ]);
        assert!(d.targeted && !d.no_store);
        assert_eq!((d.max_age, d.stale_if_error), (Some(600), Some(30)));
        let d = with_targeted(&[
            ("cache-control", "max-age=600"),
            ("cdn-cache-control", "private"),
        ]);
        assert_eq!((d.max_age, d.private), (None, Private::All));
        // The field meant for Outpost alone wins over the one for every CDN.
        let d = with_targeted(&[
            ("cdn-cache-control", "max-age=5"),
            ("outpost-cdn-cache-control", "max-age=50"),
        ]);
        assert_eq!(d.max_age, Some(50));
        // Lines combine; unknown members and parameters are ignored.
        let d = with_targeted(&[
            ("cdn-cache-control", "foo;bar=1"),
            ("cdn-cache-control", "no-cache, must-revalidate"),
        ]);
        assert!(d.no_cache && d.must_revalidate);
        // Wrong types are ignored; negative ages are invalid, hence stale; huge ones saturate.
        let d = with_targeted(&[("cdn-cache-control", "max-age=\"60\", no-store=?0")]);
        assert!(d.targeted && d.max_age.is_none() && !d.no_store);
        assert_eq!(
            with_targeted(&[("cdn-cache-control", "max-age=-1")]).max_age,
            Some(0)
        );
        assert_eq!(
            with_targeted(&[("cdn-cache-control", "max-age=99999999999")]).max_age,
            Some(DELTA_MAX)
        );
    }

    #[test]
    fn an_invalid_or_empty_cdn_cache_control_is_ignored_whole() {
        for bad in [
            "max-age=60, &&&",
            "MAX-AGE=60",
            "max-age =60",
            "",
            "max-age=60,",
        ] {
            let d = with_targeted(&[("cache-control", "max-age=7"), ("cdn-cache-control", bad)]);
            assert!(!d.targeted, "{bad:?}");
            assert_eq!(d.max_age, Some(7), "{bad:?}");
        }
    }

    #[test]
    fn no_whitespace_around_equals() {
        assert_eq!(resp(&["max-age =60"]).max_age, None);
        assert_eq!(resp(&["max-age= 60"]).max_age, Some(0));
        assert_eq!(resp(&[" max-age=60 , s-maxage=5"]).max_age, Some(60));
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
