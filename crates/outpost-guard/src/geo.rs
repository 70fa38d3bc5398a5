//! Country rules: a route may admit only some countries, or refuse some; a refusal is
//! `451 Unavailable For Legal Reasons` (RFC 7725).
//!
//! The country is what the node's context established (a trusted proxy's header or the
//! networks table). With an allow list, a client whose country is unknown is refused: an
//! allow list is a promise about who gets in.

/// A route's country rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeoRule {
    /// ISO 3166-1 alpha-2 codes admitted (empty: everyone not denied).
    pub allow: Vec<String>,
    /// Codes refused.
    pub deny: Vec<String>,
}

impl GeoRule {
    /// Whether a client from `country` may use the route.
    pub fn admits(&self, country: Option<&str>) -> bool {
        match country {
            Some(c) => {
                !self.deny.iter().any(|d| d.eq_ignore_ascii_case(c))
                    && (self.allow.is_empty()
                        || self.allow.iter().any(|a| a.eq_ignore_ascii_case(c)))
            }
            None => self.allow.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_and_deny_lists() {
        let deny = GeoRule {
            allow: vec![],
            deny: vec!["KP".into(), "IR".into()],
        };
        assert!(deny.admits(Some("JP")));
        assert!(!deny.admits(Some("kp")));
        assert!(deny.admits(None));
        let allow = GeoRule {
            allow: vec!["DE".into(), "FR".into()],
            deny: vec!["FR".into()],
        };
        assert!(allow.admits(Some("DE")));
        assert!(!allow.admits(Some("FR")), "deny wins");
        assert!(!allow.admits(Some("US")));
        assert!(
            !allow.admits(None),
            "unknown country is not in an allow list"
        );
    }
}
