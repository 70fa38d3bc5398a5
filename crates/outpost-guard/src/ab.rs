//! A/B experiments: each request gets one variant per experiment of its route, sticky for the
//! client.
//!
//! Stickiness, in order: the experiment's cookie (set on the first response), else a stable
//! hash of the authenticated `sub` (the same user gets the same variant on every device and
//! every node), else a stable hash of the client IP. The hash is xxh3 over the experiment name
//! and the id, so nodes agree without sharing state, and experiments are independent.

use std::net::IpAddr;

/// One experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// Name (the key of the `variant` claim and of `x-outpost-variant`).
    pub name: String,
    /// Cookie that pins a client to a variant.
    pub cookie: String,
    variants: Vec<(String, u32)>,
    total: u64,
}

/// A request's variant in one experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The experiment.
    pub experiment: String,
    /// The variant.
    pub variant: String,
    /// Whether the client did not carry the cookie yet (the response sets it).
    pub new: bool,
}

impl Experiment {
    /// An experiment with weighted variants; `None` when no variant has a weight.
    pub fn new(
        name: &str,
        cookie: Option<&str>,
        variants: Vec<(String, u32)>,
    ) -> Option<Experiment> {
        let total: u64 = variants.iter().map(|(_, w)| u64::from(*w)).sum();
        (total > 0).then(|| Experiment {
            name: name.to_owned(),
            cookie: cookie.map_or_else(|| format!("outpost_ab_{name}"), str::to_owned),
            variants,
            total,
        })
    }

    /// The variant for a client: its cookie if it names a variant, else by `sub`, else by IP.
    pub fn assign(&self, cookie: Option<&str>, sub: Option<&str>, ip: IpAddr) -> Assignment {
        if let Some(v) =
            cookie.filter(|v| self.variants.iter().any(|(name, w)| name == v && *w > 0))
        {
            return Assignment {
                experiment: self.name.clone(),
                variant: v.to_owned(),
                new: false,
            };
        }
        let id = match sub {
            Some(s) => format!("sub:{s}"),
            None => format!("ip:{ip}"),
        };
        Assignment {
            experiment: self.name.clone(),
            variant: self.pick(&id).to_owned(),
            new: true,
        }
    }

    fn pick(&self, id: &str) -> &str {
        let mut input = Vec::with_capacity(self.name.len() + id.len() + 1);
        input.extend_from_slice(self.name.as_bytes());
        input.push(0);
        input.extend_from_slice(id.as_bytes());
        let mut point = xxhash_rust::xxh3::xxh3_64(&input) % self.total;
        for (name, weight) in &self.variants {
            let w = u64::from(*weight);
            if point < w {
                return name;
            }
            point -= w;
        }
        // Unreachable with total > 0; the first variant is a safe answer.
        self.variants.first().map_or("", |(n, _)| n.as_str())
    }

    /// The `Set-Cookie` value pinning `variant` for 30 days.
    pub fn set_cookie(&self, variant: &str) -> String {
        format!(
            "{}={variant}; Path=/; Max-Age=2592000; SameSite=Lax",
            self.cookie
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(weights: &[(&str, u32)]) -> Experiment {
        Experiment::new(
            "checkout",
            None,
            weights.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect(),
        )
        .expect("experiment")
    }

    #[test]
    fn distribution_follows_weights_within_tolerance_over_10000_ids() {
        let e = exp(&[("a", 70), ("b", 20), ("c", 10)]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..10_000 {
            let a = e.assign(
                None,
                Some(&format!("user-{i}")),
                IpAddr::from([10, 0, 0, 1]),
            );
            *counts.entry(a.variant).or_insert(0u32) += 1;
        }
        for (name, want) in [("a", 7000.0), ("b", 2000.0), ("c", 1000.0)] {
            let got = f64::from(counts.get(name).copied().unwrap_or(0));
            // 4 standard deviations of a binomial draw: never flaky, still catches a bias.
            let p: f64 = want / 10_000.0;
            let sd = (10_000.0 * p * (1.0 - p)).sqrt();
            assert!((got - want).abs() < 4.0 * sd, "{name}: {got} vs {want}");
        }
    }

    #[test]
    fn sticky_by_cookie_then_sub_then_ip() {
        let e = exp(&[("a", 50), ("b", 50)]);
        let ip = IpAddr::from([192, 0, 2, 7]);
        let first = e.assign(None, Some("alice"), ip);
        assert!(first.new);
        for _ in 0..5 {
            assert_eq!(
                e.assign(None, Some("alice"), IpAddr::from([198, 51, 100, 1]))
                    .variant,
                first.variant
            );
        }
        let pinned = e.assign(Some("b"), Some("alice"), ip);
        assert_eq!((pinned.variant.as_str(), pinned.new), ("b", false));
        // A cookie naming no variant is ignored.
        assert!(e.assign(Some("zzz"), None, ip).new);
        assert_eq!(
            e.assign(None, None, ip).variant,
            e.assign(None, None, ip).variant
        );
        assert!(e.set_cookie("b").starts_with("outpost_ab_checkout=b;"));
        assert!(Experiment::new("x", None, vec![("a".into(), 0)]).is_none());
    }
}
