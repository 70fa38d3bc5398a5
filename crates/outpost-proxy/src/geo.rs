//! Where is the client? Location sources in order of trust, and great-circle distance.
//!
//! On the request path this runs in the context stage, before routing: the location picks the
//! nearest healthy origin endpoint. Sources, first match wins:
//! 1. `lat`/`lon` headers, then a country header — only when the TCP peer is a trusted proxy;
//! 2. the configured CIDR → location table (most specific block first);
//! 3. the node's own location.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::LazyLock;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use outpost_config::{ClientLocation, GeoPoint};

/// Country centroids (Google's public DSPL table), for country-header locations.
static COUNTRIES: LazyLock<HashMap<[u8; 2], GeoPoint>> = LazyLock::new(|| {
    include_str!("geo/countries.tsv")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split('\t');
            let code = f.next()?.as_bytes();
            let lat = f.next()?.parse().ok()?;
            let lon = f.next()?.parse().ok()?;
            Some(([*code.first()?, *code.get(1)?], GeoPoint { lat, lon }))
        })
        .collect()
});

/// Centroid of an ISO 3166-1 alpha-2 country (case-insensitive).
pub fn country_centroid(code: &str) -> Option<GeoPoint> {
    let b = code.as_bytes();
    if b.len() != 2 {
        return None;
    }
    COUNTRIES
        .get(&[b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()])
        .copied()
}

/// Which source gave a client location; logged and forwarded for debugging routing choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocationSource {
    /// Trusted latitude/longitude headers.
    Coordinates,
    /// Trusted country header, resolved to the country's centroid.
    Country,
    /// The configured network table.
    Network,
    /// Nothing known: the node's own location.
    Node,
}

impl LocationSource {
    /// Log and header value.
    pub fn as_str(self) -> &'static str {
        match self {
            LocationSource::Coordinates => "coordinates",
            LocationSource::Country => "country",
            LocationSource::Network => "network",
            LocationSource::Node => "node",
        }
    }
}

/// A client's location as far as the node knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    /// The point used for distance.
    pub point: GeoPoint,
    /// ISO country code, when a source told it.
    pub country: Option<String>,
    /// Where the point came from.
    pub source: LocationSource,
    /// Region (subdivision) of the client, when a trusted header told it.
    pub region: Option<String>,
}

/// Great-circle distance in kilometres (haversine on a spherical Earth; good to ~0.5 %).
pub fn distance_km(a: GeoPoint, b: GeoPoint) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0088;
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = la2 - la1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Resolves client IPs and locations from the connection and headers, per the config.
#[derive(Debug, Clone)]
pub struct Locator {
    trusted: Vec<IpNet>,
    lat_header: HeaderName,
    lon_header: HeaderName,
    country_header: HeaderName,
    region_header: HeaderName,
    /// Most specific first, so the first containing block wins.
    networks: Vec<(IpNet, GeoPoint, Option<String>)>,
    node: GeoPoint,
}

impl Locator {
    /// Builds the locator; header names were validated with the config.
    pub fn new(cfg: &ClientLocation, node: GeoPoint) -> Locator {
        let header = |s: &str, fallback: &'static str| {
            HeaderName::from_bytes(s.as_bytes())
                .unwrap_or_else(|_| HeaderName::from_static(fallback))
        };
        let mut networks: Vec<_> = cfg
            .networks
            .iter()
            .map(|n| (n.cidr, n.location, n.country.clone()))
            .collect();
        networks.sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
        Locator {
            trusted: cfg.trusted_proxies.clone(),
            lat_header: header(&cfg.lat_header, "x-user-lat"),
            lon_header: header(&cfg.lon_header, "x-user-lon"),
            country_header: header(&cfg.country_header, "x-user-country"),
            region_header: header(&cfg.region_header, "x-user-region"),
            networks,
            node,
        }
    }

    /// Whether headers from this peer are believed.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The headers this locator reads, so untrusted copies can be stripped before forwarding.
    pub fn location_headers(&self) -> [&HeaderName; 4] {
        [
            &self.lat_header,
            &self.lon_header,
            &self.country_header,
            &self.region_header,
        ]
    }

    /// The client's IP: the peer, or — when the peer is trusted — the rightmost address in
    /// `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, peer_trusted: bool, headers: &HeaderMap) -> IpAddr {
        if !peer_trusted {
            return canonical(peer);
        }
        let mut client = canonical(peer);
        let hops = headers
            .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Some(ip) = parse_forwarded_ip(hop) else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    /// Locates a client, trying the sources in order.
    pub fn locate(&self, client_ip: IpAddr, peer_trusted: bool, headers: &HeaderMap) -> Location {
        let mut location = self.locate_point(client_ip, peer_trusted, headers);
        if peer_trusted {
            location.region = headers
                .get(&self.region_header)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|r| {
                    !r.is_empty()
                        && r.len() <= 64
                        && r.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                })
                .map(str::to_owned);
        }
        location
    }

    fn locate_point(&self, client_ip: IpAddr, peer_trusted: bool, headers: &HeaderMap) -> Location {
        if peer_trusted {
            let coord = |h: &HeaderName| {
                headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .filter(|v| v.is_finite())
            };
            let country = headers
                .get(&self.country_header)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
                .map(str::to_ascii_uppercase);
            if let (Some(lat), Some(lon)) = (coord(&self.lat_header), coord(&self.lon_header))
                && (-90.0..=90.0).contains(&lat)
                && (-180.0..=180.0).contains(&lon)
            {
                return Location {
                    point: GeoPoint { lat, lon },
                    country,
                    source: LocationSource::Coordinates,
                    region: None,
                };
            }
            if let Some(code) = country
                && let Some(point) = country_centroid(&code)
            {
                return Location {
                    point,
                    country: Some(code),
                    source: LocationSource::Country,
                    region: None,
                };
            }
        }
        let ip = canonical(client_ip);
        if let Some((_, point, country)) = self.networks.iter().find(|(n, _, _)| n.contains(&ip)) {
            return Location {
                point: *point,
                country: country.clone(),
                source: LocationSource::Network,
                region: None,
            };
        }
        Location {
            point: self.node,
            country: None,
            source: LocationSource::Node,
            region: None,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, from dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `X-Forwarded-For` entries may carry a port (`1.2.3.4:5678`, `[::1]:80`).
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_config::Network;
    use proptest::prelude::*;

    const TOKYO: GeoPoint = GeoPoint {
        lat: 35.68,
        lon: 139.69,
    };
    const PARIS: GeoPoint = GeoPoint {
        lat: 48.85,
        lon: 2.35,
    };

    fn locator() -> Locator {
        let cfg = ClientLocation {
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("cidr")],
            networks: vec![
                Network {
                    cidr: "203.0.113.0/24".parse().expect("cidr"),
                    location: PARIS,
                    country: Some("FR".into()),
                },
                Network {
                    cidr: "203.0.0.0/16".parse().expect("cidr"),
                    location: GeoPoint { lat: 0.0, lon: 0.0 },
                    country: None,
                },
            ],
            ..ClientLocation::default()
        };
        Locator::new(&cfg, TOKYO)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn known_distances() {
        let d = distance_km(TOKYO, PARIS);
        assert!((d - 9_712.0).abs() < 30.0, "Tokyo-Paris {d}");
        assert_eq!(distance_km(PARIS, PARIS), 0.0);
    }

    #[test]
    fn trusted_coordinates_win() {
        let l = locator();
        let h = headers(&[("x-user-lat", "48.85"), ("x-user-lon", "2.35")]);
        let loc = l.locate("10.1.1.1".parse().expect("ip"), true, &h);
        assert_eq!(loc.source, LocationSource::Coordinates);
        assert_eq!(loc.point, PARIS);
    }

    #[test]
    fn untrusted_headers_are_ignored() {
        let l = locator();
        let h = headers(&[("x-user-lat", "48.85"), ("x-user-lon", "2.35")]);
        let loc = l.locate("192.0.2.1".parse().expect("ip"), false, &h);
        assert_eq!(loc.source, LocationSource::Node);
        assert_eq!(loc.point, TOKYO);
    }

    #[test]
    fn country_header_uses_centroid_and_bad_coordinates_fall_through() {
        let l = locator();
        let h = headers(&[
            ("x-user-lat", "123"),
            ("x-user-lon", "2"),
            ("x-user-country", "br"),
        ]);
        let loc = l.locate("10.0.0.1".parse().expect("ip"), true, &h);
        assert_eq!(loc.source, LocationSource::Country);
        assert_eq!(loc.country.as_deref(), Some("BR"));
        assert!(loc.point.lat < -10.0);
    }

    #[test]
    fn most_specific_network_wins() {
        let l = locator();
        let loc = l.locate("203.0.113.9".parse().expect("ip"), false, &HeaderMap::new());
        assert_eq!(loc.source, LocationSource::Network);
        assert_eq!(loc.country.as_deref(), Some("FR"));
        let loc = l.locate("203.0.1.1".parse().expect("ip"), false, &HeaderMap::new());
        assert_eq!(loc.point, GeoPoint { lat: 0.0, lon: 0.0 });
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().expect("ip");
        assert_eq!(
            l.locate(mapped, false, &HeaderMap::new()).source,
            LocationSource::Network
        );
    }

    #[test]
    fn client_ip_skips_trusted_hops_only_from_trusted_peers() {
        let l = locator();
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.5")]);
        assert_eq!(
            l.client_ip("10.0.0.1".parse().expect("ip"), true, &h),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            l.client_ip("192.0.2.1".parse().expect("ip"), false, &h),
            "192.0.2.1".parse::<IpAddr>().expect("ip")
        );
        let spoof = headers(&[("x-forwarded-for", "garbage, 198.51.100.9")]);
        assert_eq!(
            l.client_ip("10.0.0.1".parse().expect("ip"), true, &spoof),
            "198.51.100.9".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn every_country_row_parsed() {
        assert!(COUNTRIES.len() >= 240, "{}", COUNTRIES.len());
        let jp = country_centroid("JP").expect("JP");
        assert!((jp.lat - 36.2).abs() < 0.1);
    }

    proptest! {
        #[test]
        fn distance_is_a_symmetric_bounded_metric(
            a in (-90.0f64..=90.0, -180.0f64..=180.0),
            b in (-90.0f64..=90.0, -180.0f64..=180.0),
        ) {
            let a = GeoPoint { lat: a.0, lon: a.1 };
            let b = GeoPoint { lat: b.0, lon: b.1 };
            let d = distance_km(a, b);
            prop_assert!((0.0..=20_016.0).contains(&d));
            prop_assert!((d - distance_km(b, a)).abs() < 1e-6);
        }

        #[test]
        fn hostile_forwarded_for_never_panics(s in ".{0,200}") {
            let l = locator();
            let mut h = HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&s) {
                h.insert("x-forwarded-for", v);
            }
            let _ = l.client_ip("10.0.0.1".parse().expect("ip"), true, &h);
        }
    }
}
