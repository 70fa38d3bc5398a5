//! What the cache did with a request: one enum for metrics and logs ([`CacheOutcome`]) and the
//! RFC 9211 `Cache-Status` entry sent to the client ([`CacheStatus`]).

use std::fmt::Write as _;

use http::HeaderValue;

/// The lifecycle result of one request on a cached route; `as_str()` is the metric label and
/// the log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from the cache without contacting the origin.
    Hit,
    /// Served stale (stale-while-revalidate, stale-if-error or the client's max-stale).
    Stale,
    /// Fetched from the origin (stored or not).
    Miss,
    /// A stored response was validated with the origin (304) and served.
    Revalidated,
    /// The request could not use the cache at all (method, body, route setting).
    Bypass,
}

impl CacheOutcome {
    /// Every outcome, in `index()` order.
    pub const ALL: [CacheOutcome; 5] = [
        CacheOutcome::Hit,
        CacheOutcome::Stale,
        CacheOutcome::Miss,
        CacheOutcome::Revalidated,
        CacheOutcome::Bypass,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::Bypass => "bypass",
        }
    }

    /// Position in [`CacheOutcome::ALL`], for pre-resolved metric handles.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// RFC 9211 `fwd` parameter: why the request went to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// The cache was configured not to handle this request.
    Bypass,
    /// The method is not cacheable.
    Method,
    /// Nothing stored for the URI.
    UriMiss,
    /// Something stored for the URI, but no variant matched the request's `Vary` fields.
    VaryMiss,
    /// The request's directives required going forward.
    Request,
    /// The stored response was stale.
    Stale,
}

impl Fwd {
    /// The token sent in the header.
    pub fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Request => "request",
            Fwd::Stale => "stale",
        }
    }
}

/// One `Cache-Status` list member (RFC 9211 §2), built up while a request is handled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    /// Served from the cache without a forward.
    pub hit: bool,
    /// Why the request was forwarded.
    pub fwd: Option<Fwd>,
    /// The status the origin answered the forward with.
    pub fwd_status: Option<u16>,
    /// Freshness left in seconds (negative when served stale).
    pub ttl: Option<i64>,
    /// The response was (or is being) stored.
    pub stored: bool,
    /// The request waited for another request's forward.
    pub collapsed: bool,
    /// Extra reason, e.g. why a response was not stored.
    pub detail: Option<&'static str>,
}

impl CacheStatus {
    /// A hit with `ttl` seconds of freshness left.
    pub fn hit(ttl: i64) -> Self {
        CacheStatus {
            hit: true,
            ttl: Some(ttl),
            ..CacheStatus::default()
        }
    }

    /// A forward for `why`.
    pub fn fwd(why: Fwd) -> Self {
        CacheStatus {
            fwd: Some(why),
            ..CacheStatus::default()
        }
    }

    /// The header value, `outpost; hit; ttl=12` style.
    pub fn to_header(&self) -> HeaderValue {
        let mut s = String::from("outpost");
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(f) = self.fwd {
            let _ = write!(s, "; fwd={}", f.as_str());
        }
        if let Some(code) = self.fwd_status {
            let _ = write!(s, "; fwd-status={code}");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(s, "; ttl={ttl}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(d) = self.detail {
            let _ = write!(s, "; detail={d}");
        }
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("outpost"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9211_members() {
        assert_eq!(CacheStatus::hit(12).to_header(), "outpost; hit; ttl=12");
        let mut s = CacheStatus::fwd(Fwd::UriMiss);
        s.stored = true;
        assert_eq!(s.to_header(), "outpost; fwd=uri-miss; stored");
        let mut s = CacheStatus::fwd(Fwd::Stale);
        s.fwd_status = Some(503);
        s.ttl = Some(-4);
        s.detail = Some("stale-if-error");
        assert_eq!(
            s.to_header(),
            "outpost; fwd=stale; fwd-status=503; ttl=-4; detail=stale-if-error"
        );
        for (i, o) in CacheOutcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
    }
}
