//! A stored response ([`Object`]) and what is done with one: serve it (with `Age`, and a 304
//! when the client's validators match), freshen it from a 304 (RFC 9111 §3.2), and write or
//! read it in the disk format.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{
    AGE, CONTENT_LENGTH, DATE, ETAG, HeaderName, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::directives::{self, Private, ResponseDirectives};
use crate::key::CacheKey;
use crate::policy::{Freshness, RoutePolicy};

/// Tag headers origins send (Fastly's and Cloudflare's names); stored as tags, never shown to
/// clients.
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// Cloudflare-style tag header.
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// Fields a shared cache must not store (RFC 9111 §3.1): they authenticate one client to one
/// proxy, and a stored copy would be replayed to everyone.
const NEVER_STORED: [HeaderName; 3] = [
    http::header::PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy-authentication-info"),
    http::header::PROXY_AUTHORIZATION,
];

/// Whether a response field may go into a stored object (or into one refreshed by a 304).
pub fn storable_field(name: &HeaderName) -> bool {
    *name != SURROGATE_KEY && *name != CACHE_TAG && !NEVER_STORED.contains(name)
}

/// Removes every field [`storable_field`] refuses.
pub fn strip_unstorable(headers: &mut HeaderMap) {
    headers.remove(SURROGATE_KEY);
    headers.remove(CACHE_TAG);
    for name in &NEVER_STORED {
        headers.remove(name);
    }
}

/// One stored response. Immutable: freshening or soft-purging builds a new one that shares the
/// body.
#[derive(Debug, Clone)]
pub struct Object {
    /// Primary key it is stored under.
    pub key: CacheKey,
    /// Values of the request fields named by `Vary` when it was stored (secondary key).
    pub vary: Vec<(HeaderName, Option<String>)>,
    /// Response status.
    pub status: StatusCode,
    /// Response header section as stored (no hop-by-hop, no private fields, no tag headers).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Freshness facts, evaluated against the clock on every use.
    pub fresh: Freshness,
    /// Tags for purge by tag.
    pub tags: Vec<Arc<str>>,
    /// Soft-purged: stale from now on, but still usable for stale-while-revalidate and
    /// stale-if-error.
    pub purged: bool,
}

impl Object {
    /// Approximate bytes it holds, for the memory and disk bounds.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + self.key.as_str().len() + 128
    }

    /// Its strong or weak entity tag.
    pub fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(ETAG)
    }

    /// Its `Last-Modified`.
    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.headers.get(LAST_MODIFIED)
    }

    /// Whether it can be revalidated with a conditional request.
    pub fn has_validator(&self) -> bool {
        self.etag().is_some() || self.last_modified().is_some()
    }

    /// Whether `other` has the same secondary key (same variant).
    pub fn same_variant(&self, other: &Object) -> bool {
        self.vary == other.vary
    }

    /// Headers for a response served from storage: stored fields with our `Age`.
    pub fn serve_headers(&self, now: SystemTime) -> HeaderMap {
        let mut h = self.headers.clone();
        let age = self.fresh.age(now).as_secs();
        h.insert(AGE, HeaderValue::from(age));
        h
    }

    /// RFC 9111 §3.2: a copy with the 304's (or HEAD's) fields replacing stored ones, except
    /// `Content-Length` and the fields a shared cache must not store, and with freshness
    /// recomputed from the new response.
    pub fn freshen(
        &self,
        update: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        policy: &RoutePolicy,
    ) -> Object {
        let dirs = ResponseDirectives::from_headers(update);
        let mut headers = self.headers.clone();
        let mut replaced: Vec<&HeaderName> = Vec::new();
        for (name, value) in update {
            if name == CONTENT_LENGTH || !storable_field(name) {
                continue;
            }
            if !replaced.contains(&name) {
                headers.remove(name);
                replaced.push(name);
            }
            headers.append(name, value.clone());
        }
        strip_private_fields(&mut headers, &dirs.private);
        if !update.contains_key(DATE) {
            headers.insert(DATE, date_value(response_time));
        }
        let merged_dirs = ResponseDirectives::from_headers(&headers);
        let fresh = Freshness::compute(
            self.status,
            &headers,
            &merged_dirs,
            request_time,
            response_time,
            policy,
        );
        let mut tags = tags_of(update);
        if tags.is_empty() {
            tags = self.tags.clone();
        }
        Object {
            key: self.key.clone(),
            vary: self.vary.clone(),
            status: self.status,
            headers,
            body: self.body.clone(),
            fresh,
            tags,
            purged: false,
        }
    }

    /// RFC 9110 §13.1.2/§13.1.3 evaluated on a stored response for a GET/HEAD: does the
    /// client already have it?
    pub fn not_modified_for(&self, request: &HeaderMap) -> bool {
        if let Some(inm) = request.get(IF_NONE_MATCH) {
            let Some(etag) = self.etag() else {
                return false;
            };
            let ours = weak(etag.as_bytes().trim_ascii());
            return entity_tags(inm.as_bytes()).any(|t| t == b"*" || weak(t) == ours);
        }
        if let Some(ims) = request
            .get(IF_MODIFIED_SINCE)
            .and_then(directives::http_date)
        {
            let lm = self
                .last_modified()
                .and_then(directives::http_date)
                .or_else(|| self.headers.get(DATE).and_then(directives::http_date));
            return lm.is_some_and(|lm| lm <= ims);
        }
        false
    }
}

/// A single byte range of a stored body (RFC 9110 §14.1.2), resolved against its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// Serve `start..=end` as 206.
    Satisfiable(u64, u64),
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

/// Parses `Range: bytes=…` with exactly one range; `None` (serve the whole body, which RFC
/// 9110 allows) for multiple ranges, other units or syntax errors.
pub fn byte_range(header: &HeaderValue, len: u64) -> Option<ByteRange> {
    let spec = header.to_str().ok()?.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if first.is_empty() {
        if !digits(last) {
            return None;
        }
        let suffix: u64 = last.parse().ok()?;
        if suffix == 0 || len == 0 {
            return Some(ByteRange::Unsatisfiable);
        }
        return Some(ByteRange::Satisfiable(len.saturating_sub(suffix), len - 1));
    }
    if !digits(first) || !(last.is_empty() || digits(last)) {
        return None;
    }
    let start: u64 = first.parse().ok()?;
    let end = if last.is_empty() {
        u64::MAX
    } else {
        last.parse().ok()?
    };
    if end < start {
        return None;
    }
    if start >= len {
        return Some(ByteRange::Unsatisfiable);
    }
    Some(ByteRange::Satisfiable(start, end.min(len - 1)))
}

/// The opaque part of an entity tag, for weak comparison.
/// The opaque part of an entity tag, for weak comparison (RFC 9110 §8.8.3.2).
fn weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// The members of an `If-None-Match` list: `*` or entity tags with their quotes. Bytes, not
/// text: an entity tag may hold obs-text, and a comma inside quotes does not split. Stops at
/// the first malformed member.
fn entity_tags(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = list;
    std::iter::from_fn(move || {
        let start = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b','))?;
        rest = &rest[start..];
        if rest[0] == b'*' {
            let tag = &rest[..1];
            rest = &rest[1..];
            return Some(tag);
        }
        let prefix = if rest.starts_with(b"W/") { 2 } else { 0 };
        if rest.get(prefix) != Some(&b'"') {
            rest = &[];
            return None;
        }
        let Some(close) = rest[prefix + 1..].iter().position(|b| *b == b'"') else {
            rest = &[];
            return None;
        };
        let end = prefix + close + 2;
        let tag = &rest[..end];
        rest = &rest[end..];
        Some(tag)
    })
}

/// Fields a 304 carries (RFC 9110 §15.4.5), from the stored response.
pub fn not_modified_headers(full: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in [
        http::header::CACHE_CONTROL,
        http::header::CONTENT_LOCATION,
        DATE,
        ETAG,
        http::header::EXPIRES,
        http::header::VARY,
        LAST_MODIFIED,
        AGE,
    ] {
        for v in full.get_all(&name) {
            h.append(name.clone(), v.clone());
        }
    }
    h
}

/// Removes the fields a qualified `private="…"` names.
pub fn strip_private_fields(headers: &mut HeaderMap, private: &Private) {
    if let Private::Fields(names) = private {
        for n in names {
            if let Ok(name) = HeaderName::from_bytes(n.as_bytes()) {
                headers.remove(name);
            }
        }
    }
}

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated).
pub fn tags_of(headers: &HeaderMap) -> Vec<Arc<str>> {
    let mut tags: Vec<Arc<str>> = Vec::new();
    let mut add = |t: &str| {
        if !t.is_empty() && !tags.iter().any(|x| &**x == t) {
            tags.push(t.into());
        }
    };
    for v in headers.get_all(SURROGATE_KEY) {
        if let Ok(v) = v.to_str() {
            v.split_ascii_whitespace().for_each(&mut add);
        }
    }
    for v in headers.get_all(CACHE_TAG) {
        if let Ok(v) = v.to_str() {
            v.split(',').map(str::trim).for_each(&mut add);
        }
    }
    tags
}

/// A `Date` value for `t`.
pub fn date_value(t: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&directives::fmt_http_date(t))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

// ---- disk format ---------------------------------------------------------------------------
//
// file   = magic "OPCACHE1" | meta_len u32 | meta_crc u32 | body_len u64 | body_crc u32
//          | meta | bodies
// meta   = count u32, then per variant: key str | status u16 | flags u8 | lifetime u64 |
//          initial_age u64 | response_time (secs u64, nanos u32) | swr u64 | sie u64 |
//          vary list | header list | tag list | body_len u64
// Every integer is big-endian, every string/bytes is u32-length-prefixed; both sections are
// checksummed (CRC-32) so a torn or corrupted file is detected and dropped, never served.

const MAGIC: &[u8; 8] = b"OPCACHE1";
/// Bytes before the meta section.
pub const PREFIX_LEN: usize = 8 + 4 + 4 + 8 + 4;

/// Why a disk entry was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Wrong magic (not our file, or an older format).
    #[error("not an Outpost cache file (bad magic)")]
    Magic,
    /// A checksum did not match: the file is torn or corrupted.
    #[error("checksum mismatch in the {0} section")]
    Checksum(&'static str),
    /// The structure ran past its end or held an invalid value.
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
}

/// Encodes the variants of one key into the file format.
pub fn encode(variants: &[Arc<Object>]) -> Vec<u8> {
    let mut meta = BytesMut::new();
    meta.put_u32(variants.len() as u32);
    for o in variants {
        put_str(&mut meta, o.key.as_str());
        meta.put_u16(o.status.as_u16());
        let flags = u8::from(o.purged)
            | (u8::from(o.fresh.must_revalidate) << 1)
            | (u8::from(o.fresh.no_cache) << 2)
            | (u8::from(o.fresh.heuristic) << 3);
        meta.put_u8(flags);
        meta.put_u64(o.fresh.lifetime.as_secs());
        meta.put_u64(o.fresh.corrected_initial_age.as_secs());
        let rt = o
            .fresh
            .response_time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        meta.put_u64(rt.as_secs());
        meta.put_u32(rt.subsec_nanos());
        meta.put_u64(o.fresh.stale_while_revalidate.as_secs());
        meta.put_u64(o.fresh.stale_if_error.as_secs());
        meta.put_u32(o.vary.len() as u32);
        for (n, v) in &o.vary {
            put_str(&mut meta, n.as_str());
            match v {
                Some(v) => {
                    meta.put_u8(1);
                    put_str(&mut meta, v);
                }
                None => meta.put_u8(0),
            }
        }
        meta.put_u32(o.headers.len() as u32);
        for (n, v) in &o.headers {
            put_str(&mut meta, n.as_str());
            put_bytes(&mut meta, v.as_bytes());
        }
        meta.put_u32(o.tags.len() as u32);
        for t in &o.tags {
            put_str(&mut meta, t);
        }
        meta.put_u64(o.body.len() as u64);
    }
    let body_len: usize = variants.iter().map(|o| o.body.len()).sum();
    let mut body_crc = crc32fast::Hasher::new();
    for o in variants {
        body_crc.update(&o.body);
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + meta.len() + body_len);
    out.extend_from_slice(MAGIC);
    out.put_u32(meta.len() as u32);
    out.put_u32(crc32fast::hash(&meta));
    out.put_u64(body_len as u64);
    out.put_u32(body_crc.finalize());
    out.extend_from_slice(&meta);
    for o in variants {
        out.extend_from_slice(&o.body);
    }
    out
}

/// The sizes in a file's prefix: `(meta_len, meta_crc, body_len, body_crc)`.
pub fn decode_prefix(prefix: &[u8]) -> Result<(usize, u32, u64, u32), DecodeError> {
    if prefix.len() < PREFIX_LEN || &prefix[..8] != MAGIC {
        return Err(DecodeError::Magic);
    }
    let mut b = &prefix[8..PREFIX_LEN];
    Ok((b.get_u32() as usize, b.get_u32(), b.get_u64(), b.get_u32()))
}

/// Decodes a whole file. With `body == None` only the meta is decoded (start-up index scan) and
/// the objects get empty bodies.
pub fn decode(prefix: &[u8], meta: &[u8], body: Option<&[u8]>) -> Result<Vec<Object>, DecodeError> {
    let (meta_len, meta_crc, body_len, body_crc) = decode_prefix(prefix)?;
    if meta.len() != meta_len || crc32fast::hash(meta) != meta_crc {
        return Err(DecodeError::Checksum("meta"));
    }
    let body = match body {
        Some(b) => {
            if b.len() as u64 != body_len || crc32fast::hash(b) != body_crc {
                return Err(DecodeError::Checksum("body"));
            }
            Some(Bytes::copy_from_slice(b))
        }
        None => None,
    };
    let mut m = meta;
    let count = get_u32(&mut m)?;
    let mut out = Vec::new();
    let mut offset = 0usize;
    for _ in 0..count {
        let key = CacheKey::from_stored(&get_str(&mut m)?);
        let status =
            StatusCode::from_u16(get_u16(&mut m)?).map_err(|_| DecodeError::Malformed("status"))?;
        let flags = get_u8(&mut m)?;
        let lifetime = Duration::from_secs(get_u64(&mut m)?);
        let initial_age = Duration::from_secs(get_u64(&mut m)?);
        let secs = get_u64(&mut m)?;
        let nanos = get_u32(&mut m)?;
        let response_time = UNIX_EPOCH
            .checked_add(Duration::new(secs, nanos.min(999_999_999)))
            .ok_or(DecodeError::Malformed("time"))?;
        let swr = Duration::from_secs(get_u64(&mut m)?);
        let sie = Duration::from_secs(get_u64(&mut m)?);
        let mut vary = Vec::new();
        for _ in 0..get_u32(&mut m)? {
            let name = HeaderName::from_bytes(get_str(&mut m)?.as_bytes())
                .map_err(|_| DecodeError::Malformed("vary name"))?;
            let value = match get_u8(&mut m)? {
                0 => None,
                _ => Some(get_str(&mut m)?),
            };
            vary.push((name, value));
        }
        let mut headers = HeaderMap::new();
        for _ in 0..get_u32(&mut m)? {
            let name = HeaderName::from_bytes(get_str(&mut m)?.as_bytes())
                .map_err(|_| DecodeError::Malformed("header name"))?;
            let value = HeaderValue::from_bytes(&get_bytes(&mut m)?)
                .map_err(|_| DecodeError::Malformed("header value"))?;
            headers.append(name, value);
        }
        let mut tags = Vec::new();
        for _ in 0..get_u32(&mut m)? {
            tags.push(Arc::from(get_str(&mut m)?));
        }
        let len = usize::try_from(get_u64(&mut m)?).map_err(|_| DecodeError::Malformed("len"))?;
        let body = match &body {
            Some(all) => {
                let end = offset
                    .checked_add(len)
                    .filter(|e| *e <= all.len())
                    .ok_or(DecodeError::Malformed("body length"))?;
                all.slice(offset..end)
            }
            None => Bytes::new(),
        };
        offset += len;
        out.push(Object {
            key,
            vary,
            status,
            headers,
            body,
            fresh: Freshness {
                lifetime,
                corrected_initial_age: initial_age,
                response_time,
                stale_while_revalidate: swr,
                stale_if_error: sie,
                must_revalidate: flags & 2 != 0,
                no_cache: flags & 4 != 0,
                heuristic: flags & 8 != 0,
            },
            tags,
            purged: flags & 1 != 0,
        });
    }
    if !m.is_empty() || (body.is_some() && offset as u64 != body_len) {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(out)
}

fn put_str(b: &mut BytesMut, s: &str) {
    put_bytes(b, s.as_bytes());
}
fn put_bytes(b: &mut BytesMut, s: &[u8]) {
    b.put_u32(s.len() as u32);
    b.put_slice(s);
}
fn need(m: &[u8], n: usize) -> Result<(), DecodeError> {
    if m.len() < n {
        Err(DecodeError::Malformed("truncated"))
    } else {
        Ok(())
    }
}
fn get_u8(m: &mut &[u8]) -> Result<u8, DecodeError> {
    need(m, 1)?;
    Ok(m.get_u8())
}
fn get_u16(m: &mut &[u8]) -> Result<u16, DecodeError> {
    need(m, 2)?;
    Ok(m.get_u16())
}
fn get_u32(m: &mut &[u8]) -> Result<u32, DecodeError> {
    need(m, 4)?;
    Ok(m.get_u32())
}
fn get_u64(m: &mut &[u8]) -> Result<u64, DecodeError> {
    need(m, 8)?;
    Ok(m.get_u64())
}
fn get_bytes(m: &mut &[u8]) -> Result<Vec<u8>, DecodeError> {
    let n = get_u32(m)? as usize;
    need(m, n)?;
    let v = m[..n].to_vec();
    m.advance(n);
    Ok(v)
}
fn get_str(m: &mut &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(get_bytes(m)?).map_err(|_| DecodeError::Malformed("utf-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyPolicy;

    pub(crate) fn sample(body: &'static [u8]) -> Object {
        let mut headers = HeaderMap::new();
        headers.insert(ETAG, HeaderValue::from_static("\"v1\""));
        headers.insert(
            LAST_MODIFIED,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert("x-extra", HeaderValue::from_static("old"));
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let policy = RoutePolicy::default();
        Object {
            key: CacheKey::new(&KeyPolicy::default(), "h", "/a", &HeaderMap::new()),
            vary: vec![(HeaderName::from_static("accept"), Some("text/html".into()))],
            status: StatusCode::OK,
            fresh: Freshness::compute(
                StatusCode::OK,
                &headers,
                &ResponseDirectives::from_headers(&headers),
                t,
                t,
                &policy,
            ),
            headers,
            body: Bytes::from_static(body),
            tags: vec!["t1".into(), "t2".into()],
            purged: false,
        }
    }

    #[test]
    fn freshen_replaces_fields_but_not_content_length() {
        let o = sample(b"hello");
        let mut update = HeaderMap::new();
        update.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=600"),
        );
        update.insert("x-extra", HeaderValue::from_static("new"));
        update.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let f = o.freshen(&update, t, t, &RoutePolicy::default());
        assert_eq!(f.headers["x-extra"], "new");
        assert_eq!(f.headers.get_all("x-extra").iter().count(), 1);
        assert_eq!(f.headers[CONTENT_LENGTH], "5");
        assert_eq!(f.headers[ETAG], "\"v1\"");
        assert_eq!(f.fresh.lifetime, Duration::from_secs(600));
        assert_eq!(f.fresh.age(t), Duration::ZERO);
        assert_eq!(f.body, o.body);
        assert_eq!(f.tags, o.tags);
    }

    #[test]
    fn conditionals_compare_weakly_and_by_date() {
        let o = sample(b"x");
        let req = |n: HeaderName, v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(n, HeaderValue::from_static(v));
            h
        };
        assert!(o.not_modified_for(&req(IF_NONE_MATCH, "\"v1\"")));
        assert!(o.not_modified_for(&req(IF_NONE_MATCH, "\"x\", W/\"v1\"")));
        assert!(o.not_modified_for(&req(IF_NONE_MATCH, "*")));
        assert!(!o.not_modified_for(&req(IF_NONE_MATCH, "\"v2\"")));
        assert!(o.not_modified_for(&req(IF_MODIFIED_SINCE, "Sun, 06 Nov 1994 08:49:37 GMT")));
        assert!(!o.not_modified_for(&req(IF_MODIFIED_SINCE, "Sat, 05 Nov 1994 08:49:37 GMT")));
        assert!(!o.not_modified_for(&HeaderMap::new()));
    }

    #[test]
    fn entity_tags_are_compared_as_bytes_and_split_outside_quotes() {
        let tags = |v: &[u8]| {
            entity_tags(v)
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(tags(b"\"a\", W/\"b,c\" ,*"), ["\"a\"", "W/\"b,c\"", "*"]);
        assert_eq!(tags(b"\"a\", junk, \"b\""), ["\"a\""]);
        assert_eq!(tags(b"\"unterminated"), Vec::<String>::new());
        let mut o = sample(b"x");
        let obs = HeaderValue::from_bytes(b"\"caf\xe9\"").expect("obs-text is allowed");
        o.headers.insert(ETAG, obs.clone());
        let mut req = HeaderMap::new();
        req.insert(IF_NONE_MATCH, obs);
        assert!(o.not_modified_for(&req));
        req.insert(
            IF_NONE_MATCH,
            HeaderValue::from_bytes(b"\"caf\xe8\"").expect("obs-text"),
        );
        assert!(!o.not_modified_for(&req));
    }

    proptest::proptest! {
        /// Meta sections that pass their checksum but hold garbage (a foreign writer, a format
        /// bug) are rejected with an error, never a panic.
        #[test]
        fn garbage_meta_with_a_valid_checksum_is_rejected_cleanly(
            meta in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let mut prefix = Vec::new();
            prefix.extend_from_slice(MAGIC);
            prefix.put_u32(meta.len() as u32);
            prefix.put_u32(crc32fast::hash(&meta));
            prefix.put_u64(body.len() as u64);
            prefix.put_u32(crc32fast::hash(&body));
            let _ = decode(&prefix, &meta, Some(&body));
            let _ = decode(&prefix, &meta, None);
        }
    }

    #[test]
    fn byte_ranges() {
        let r = |v: &'static str| byte_range(&HeaderValue::from_static(v), 10);
        assert_eq!(r("bytes=0-3"), Some(ByteRange::Satisfiable(0, 3)));
        assert_eq!(r("bytes=5-"), Some(ByteRange::Satisfiable(5, 9)));
        assert_eq!(r("bytes=-4"), Some(ByteRange::Satisfiable(6, 9)));
        assert_eq!(r("bytes=-40"), Some(ByteRange::Satisfiable(0, 9)));
        assert_eq!(r("bytes=8-100"), Some(ByteRange::Satisfiable(8, 9)));
        assert_eq!(r("bytes=10-"), Some(ByteRange::Unsatisfiable));
        assert_eq!(r("bytes=0-1,3-4"), None);
        assert_eq!(r("bytes=3-1"), None);
        assert_eq!(r("items=0-1"), None);
        assert_eq!(r("bytes=a-b"), None);
    }

    #[test]
    fn disk_format_round_trips_and_detects_corruption() {
        let a = Arc::new(sample(b"first body"));
        let mut b = sample(b"second");
        b.vary = vec![(HeaderName::from_static("accept"), None)];
        b.purged = true;
        let file = encode(&[a.clone(), Arc::new(b)]);
        let (meta_len, ..) = decode_prefix(&file).expect("prefix");
        let meta = &file[PREFIX_LEN..PREFIX_LEN + meta_len];
        let body = &file[PREFIX_LEN + meta_len..];
        let back = decode(&file, meta, Some(body)).expect("decodes");
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].body, a.body);
        assert_eq!(back[0].headers, a.headers);
        assert_eq!(back[0].fresh, a.fresh);
        assert_eq!(back[0].key, a.key);
        assert_eq!(back[1].body, Bytes::from_static(b"second"));
        assert!(back[1].purged);
        assert_eq!(back[1].vary[0].1, None);

        for i in [0, 9, PREFIX_LEN + 3, file.len() - 1] {
            let mut bad = file.clone();
            bad[i] ^= 0x40;
            let (ml, ..) = match decode_prefix(&bad) {
                Ok(p) => p,
                Err(_) => continue,
            };
            let ok = ml + PREFIX_LEN <= bad.len()
                && decode(
                    &bad,
                    &bad[PREFIX_LEN..PREFIX_LEN + ml],
                    Some(&bad[PREFIX_LEN + ml..]),
                )
                .is_ok();
            assert!(!ok, "flipping byte {i} must be detected");
        }
    }
}
