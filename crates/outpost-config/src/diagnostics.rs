//! Diagnostics: every config problem rendered as `file:line:col`, a caret snippet and `help:`.
//!
//! Parser and serde errors arrive with a byte span; validation problems arrive with a key path
//! (`routes[1].origin`) that [`locate`] resolves to the span of that value in the source, using
//! toml's spanned document. Rendering uses `annotate-snippets` (rustc's renderer), plain text.

use std::ops::Range;

use annotate_snippets::{Level, Renderer, Snippet};
use toml::de::{DeTable, DeValue};

use crate::validate::{PathSeg, Problem};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// What is wrong, one sentence.
    pub message: String,
    /// Where in the source, as a byte range; `None` when the problem has no single place.
    pub span: Option<Range<usize>>,
    /// Short text under the caret.
    pub label: String,
    /// How to fix it.
    pub help: Option<String>,
}

/// All problems of one file, with the source kept for rendering.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    origin: String,
    src: String,
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Bundles problems with the source they point into.
    pub fn new(origin: &str, src: &str, items: Vec<Diagnostic>) -> Self {
        Diagnostics {
            origin: origin.to_owned(),
            src: src.to_owned(),
            items,
        }
    }

    /// The individual problems, for callers that want structure instead of text.
    pub fn items(&self) -> &[Diagnostic] {
        &self.items
    }

    /// Renders every problem as rustc-style text with `file:line:col`.
    pub fn render(&self) -> String {
        let renderer = Renderer::plain();
        let mut out = String::new();
        for (i, d) in self.items.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let mut msg = Level::Error.title(&d.message);
            if let Some(span) = &d.span {
                let span = clamp(span.clone(), self.src.len());
                msg = msg.snippet(
                    Snippet::source(&self.src)
                        .origin(&self.origin)
                        .fold(true)
                        .annotation(Level::Error.span(span).label(&d.label)),
                );
            } else {
                msg = msg.snippet(Snippet::source("").origin(&self.origin));
            }
            if let Some(help) = &d.help {
                msg = msg.footer(Level::Help.title(help));
            }
            out.push_str(&renderer.render(msg).to_string());
            out.push('\n');
        }
        if self.items.len() > 1 {
            out.push_str(&format!(
                "\nerror: {} problems in {}\n",
                self.items.len(),
                self.origin
            ));
        }
        out
    }
}

fn clamp(span: Range<usize>, len: usize) -> Range<usize> {
    let start = span.start.min(len);
    let end = span.end.clamp(start, len);
    start..end
}

/// Turns a TOML parse or serde error into a diagnostic, adding a did-you-mean where serde listed
/// the expected keys or variants.
pub fn from_toml_error(e: &toml::de::Error) -> Diagnostic {
    let message = e.message().trim().to_owned();
    let help = help_for_serde_message(&message);
    let label = if message.starts_with("unknown field") {
        "unknown key".to_owned()
    } else if message.starts_with("missing field") {
        "in this table".to_owned()
    } else {
        "here".to_owned()
    };
    let help = help.or_else(|| {
        let from_serde = ["invalid", "unknown", "missing", "duplicate"]
            .iter()
            .any(|w| message.starts_with(w));
        (!from_serde).then(|| {
            "this is TOML syntax: tables are `[name]`, keys `key = value`, strings in quotes"
                .to_owned()
        })
    });
    Diagnostic {
        message: first_sentence(&message),
        span: e.span(),
        label,
        help,
    }
}

fn first_sentence(message: &str) -> String {
    // serde lists every expected key or variant after the first comma; the help line carries
    // the useful part of that list.
    if !message.starts_with("unknown ") {
        return message.to_owned();
    }
    match message.split_once(", expected") {
        Some((head, _)) => head.to_owned(),
        None => message.to_owned(),
    }
}

fn help_for_serde_message(message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (got, tail) = rest.split_once('`')?;
        let expected = backticked(tail);
        return Some(match did_you_mean(got, &expected) {
            Some(best) => format!("did you mean `{best}`?"),
            None if expected.is_empty() => "this table takes no keys".to_owned(),
            None => format!("expected one of: {}", expected.join(", ")),
        });
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (got, tail) = rest.split_once('`')?;
        let expected = backticked(tail);
        return Some(match did_you_mean(got, &expected) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!("expected one of: {}", expected.join(", ")),
        });
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let (field, _) = rest.split_once('`')?;
        return Some(format!("add `{field} = ...` to this table"));
    }
    if message.contains("duration") || message.contains("time unit") {
        return Some(
            "durations are strings with a unit, e.g. \"250ms\", \"30s\", \"5m\"".to_owned(),
        );
    }
    if message.contains("invalid IP address syntax") || message.contains("IpNet") {
        return Some("networks are written as CIDR blocks, e.g. \"10.0.0.0/8\"".to_owned());
    }
    None
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// The closest candidate to `got` when it is close enough to be a typo.
pub fn did_you_mean<S: AsRef<str>>(got: &str, candidates: &[S]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(got, c.as_ref()), c.as_ref()))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
}

/// Resolves validation problems' key paths to spans in the source.
pub fn locate(src: &str, problems: Vec<Problem>) -> Vec<Diagnostic> {
    let doc = DeTable::parse(src).ok();
    problems
        .into_iter()
        .map(|p| {
            let span = doc.as_ref().and_then(|d| span_of(src, d, &p.path));
            Diagnostic {
                message: p.message,
                span,
                label: p.label,
                help: p.help,
            }
        })
        .collect()
}

fn span_of(src: &str, doc: &toml::Spanned<DeTable<'_>>, path: &[PathSeg]) -> Option<Range<usize>> {
    let mut best = None;
    let mut current: Option<&toml::Spanned<DeValue<'_>>> = None;
    for seg in path {
        let next = match (seg, current) {
            (PathSeg::Key(k), None) => doc
                .get_ref()
                .iter()
                .find(|(key, _)| key.get_ref() == k)
                .map(|(key, v)| (key.span(), v)),
            (PathSeg::Key(k), Some(v)) => v.get_ref().as_table().and_then(|t| {
                t.iter()
                    .find(|(key, _)| key.get_ref() == k)
                    .map(|(key, v)| (key.span(), v))
            }),
            (PathSeg::Index(i), Some(v)) => v.get_ref().get(*i).map(|v| (v.span(), v)),
            (PathSeg::Index(_), None) => None,
        };
        match next {
            Some((key_span, value)) => {
                // A section spans many lines: point at its key instead. One-line values (inline
                // tables included) are shown whole.
                let one_line = src
                    .get(value.span())
                    .is_some_and(|text| !text.contains('\n'));
                let span = if one_line { value.span() } else { key_span };
                best = Some(span);
                current = Some(value);
            }
            None => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_typos_and_ignores_strangers() {
        let keys = ["addr", "tls", "http2"];
        assert_eq!(did_you_mean("adr", &keys).as_deref(), Some("addr"));
        assert_eq!(did_you_mean("zzzzzz", &keys), None);
    }

    #[test]
    fn backticked_lists_expected_names() {
        assert_eq!(
            backticked(", expected one of `addr`, `tls`, `http2`"),
            vec!["addr", "tls", "http2"]
        );
    }
}
