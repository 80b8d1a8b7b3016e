//! The `bindings` query parameter: parsed and validated once, at the edge, into a
//! canonical [`BindingSet`]. Everything behind this module trusts a `BindingSet`.
//!
//! Invariants enforced here:
//! - every exchange name and routing-key pattern is a string of at most
//!   [`MAX_NAME_BYTES`] bytes (AMQP's short-string limit), so building broker frames from
//!   them can never fail or panic;
//! - every exchange name is non-empty and starts with one of the allowed prefixes;
//! - a set holds at most `max_bindings` entries, sorted and de-duplicated, so two clients
//!   asking for the same bindings in another order or with repeats share one subscription;
//! - a pattern has at most `max_pattern_words` words and `max_pattern_hashes` `#`
//!   wildcards: every message on the exchange is matched against it, in the gateway's
//!   trie and in RabbitMQ's, and `#` makes that matching backtrack.
//!
//! Error texts the original Taskcluster service sends are kept word for word (clients and
//! tests match on them); cases the original left to crash get a clear text of our own.

use std::fmt;

use serde_json::Value;

/// AMQP short strings (exchange names, routing keys) hold at most 255 bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// One `(exchange, routingKeyPattern)` pair.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding {
    pub exchange: String,
    pub pattern: String,
}

/// A client's bindings in canonical form: sorted and without duplicates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BindingSet(Box<[Binding]>);

impl BindingSet {
    /// Builds the canonical set from any list of bindings (sorts and de-duplicates).
    pub fn new(mut bindings: Vec<Binding>) -> Self {
        bindings.sort_unstable();
        bindings.dedup();
        Self(bindings.into_boxed_slice())
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Binding> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for BindingSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}:{}", b.exchange, b.pattern)?;
        }
        Ok(())
    }
}

/// What a client may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most bindings one connection may name (before de-duplication).
    pub max_bindings: usize,
    /// An exchange name must start with one of these (an empty list allows any name).
    pub allowed_exchange_prefixes: Vec<String>,
    /// Most words (`.`-separated) in a routing-key pattern.
    pub max_pattern_words: usize,
    /// Most `#` wildcards in a routing-key pattern.
    pub max_pattern_hashes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bindings: 100,
            allowed_exchange_prefixes: vec!["exchange/".to_owned()],
            max_pattern_words: 32,
            max_pattern_hashes: 3,
        }
    }
}

/// Which field of a binding entry an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Exchange,
    RoutingKeyPattern,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Exchange => "exchange",
            Field::RoutingKeyPattern => "routingKeyPattern",
        })
    }
}

/// Why a `bindings` parameter was refused. `Display` is the text sent to the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error(
        "The query parameter `bindings` is missing: expected ?bindings=<URL-encoded JSON {{\"bindings\": [{{exchange, routingKeyPattern}}, ...]}}>"
    )]
    Missing,
    #[error("The query parameter `bindings` is empty")]
    Empty,
    /// Not JSON; the text imitates the V8 `JSON.parse` message the original sent.
    #[error("{0}")]
    Json(String),
    #[error("The json query should have only one key i.e. `bindings`.")]
    OnlyOneKey,
    #[error("Bindings must be an array of {{exchange, routingKeyPattern}}")]
    NotAnArray,
    #[error("Too many bindings: {given} given, at most {max} are allowed per connection")]
    TooMany { given: usize, max: usize },
    #[error("Binding {index} must be an object {{exchange, routingKeyPattern}}")]
    NotAnObject { index: usize },
    #[error("Binding must include `exchange` and `routingKeyPattern` fields")]
    MissingField,
    #[error("Binding {index}: `{field}` must be a string")]
    NotAString { index: usize, field: Field },
    #[error("Binding {index}: `exchange` must not be empty")]
    EmptyExchange { index: usize },
    #[error("Binding {index}: `{field}` is {len} bytes long; AMQP allows at most {MAX_NAME_BYTES}")]
    TooLong {
        index: usize,
        field: Field,
        len: usize,
    },
    #[error("Exchange `{exchange}` is not allowed: exchange names must start with {allowed}")]
    NotAllowed { exchange: String, allowed: String },
    #[error("Binding {index}: `routingKeyPattern` has {words} words; at most {max} are allowed")]
    TooManyWords {
        index: usize,
        words: usize,
        max: usize,
    },
    #[error(
        "Binding {index}: `routingKeyPattern` has {hashes} `#` wildcards; at most {max} are allowed"
    )]
    TooManyHashes {
        index: usize,
        hashes: usize,
        max: usize,
    },
}

impl BindingError {
    /// Whether a pattern was refused for its words or wildcards (a limit on what clients
    /// may ask, counted apart from malformed input).
    pub fn is_pattern_limit(&self) -> bool {
        matches!(
            self,
            BindingError::TooManyWords { .. } | BindingError::TooManyHashes { .. }
        )
    }
}

/// Whether query parameter `name` is set to `1` or `true` (the first one counts).
pub fn query_flag(raw_query: Option<&str>, name: &str) -> bool {
    raw_query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v == "1" || v.eq_ignore_ascii_case("true"))
        })
        .unwrap_or(false)
}

/// Parses the raw query string of a connect request (without the `?`).
///
/// The first `bindings` parameter counts; others are ignored, as Express did.
pub fn parse_query(raw_query: Option<&str>, limits: &Limits) -> Result<BindingSet, BindingError> {
    let value = raw_query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "bindings")
                .map(|(_, v)| v.into_owned())
        })
        .ok_or(BindingError::Missing)?;
    if value.is_empty() {
        return Err(BindingError::Empty);
    }
    parse_json(&value, limits)
}

/// Parses and validates the JSON document `{"bindings": [...]}`.
pub fn parse_json(text: &str, limits: &Limits) -> Result<BindingSet, BindingError> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| BindingError::Json(v8_json_error(text, &e)))?;
    let Value::Object(top) = doc else {
        return Err(BindingError::OnlyOneKey);
    };
    if top.len() != 1 {
        return Err(BindingError::OnlyOneKey);
    }
    let Some(bindings) = top.get("bindings") else {
        return Err(BindingError::OnlyOneKey);
    };
    let Value::Array(entries) = bindings else {
        return Err(BindingError::NotAnArray);
    };
    if entries.len() > limits.max_bindings {
        return Err(BindingError::TooMany {
            given: entries.len(),
            max: limits.max_bindings,
        });
    }
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(BindingError::NotAnObject { index });
        };
        let (Some(exchange), Some(pattern)) =
            (entry.get("exchange"), entry.get("routingKeyPattern"))
        else {
            return Err(BindingError::MissingField);
        };
        let exchange = name(exchange, index, Field::Exchange)?;
        let pattern = name(pattern, index, Field::RoutingKeyPattern)?;
        out.push(checked(exchange, pattern, index, limits)?);
    }
    Ok(BindingSet::new(out))
}

/// Validates bindings given as strings (the WebSocket protocol's subscribe frames) with
/// the checks of [`parse_json`]: lengths, exchange prefixes, pattern words and wildcards.
pub fn check_pairs<'a>(
    pairs: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    limits: &Limits,
) -> Result<BindingSet, BindingError> {
    if pairs.len() > limits.max_bindings {
        return Err(BindingError::TooMany {
            given: pairs.len(),
            max: limits.max_bindings,
        });
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (index, (exchange, pattern)) in pairs.enumerate() {
        for (field, value) in [
            (Field::Exchange, exchange),
            (Field::RoutingKeyPattern, pattern),
        ] {
            if value.len() > MAX_NAME_BYTES {
                return Err(BindingError::TooLong {
                    index,
                    field,
                    len: value.len(),
                });
            }
        }
        out.push(checked(exchange, pattern, index, limits)?);
    }
    Ok(BindingSet::new(out))
}

/// One binding whose strings are within AMQP's length: its exchange named and allowed,
/// its pattern within the word and wildcard limits.
fn checked(
    exchange: &str,
    pattern: &str,
    index: usize,
    limits: &Limits,
) -> Result<Binding, BindingError> {
    if exchange.is_empty() {
        return Err(BindingError::EmptyExchange { index });
    }
    check_allowed(exchange, limits)?;
    check_pattern(pattern, index, limits)?;
    Ok(Binding {
        exchange: exchange.to_owned(),
        pattern: pattern.to_owned(),
    })
}

fn name(value: &Value, index: usize, field: Field) -> Result<&str, BindingError> {
    let Value::String(s) = value else {
        return Err(BindingError::NotAString { index, field });
    };
    if s.len() > MAX_NAME_BYTES {
        return Err(BindingError::TooLong {
            index,
            field,
            len: s.len(),
        });
    }
    Ok(s)
}

/// A pattern's words and `#` wildcards within the limits.
fn check_pattern(pattern: &str, index: usize, limits: &Limits) -> Result<(), BindingError> {
    let words = pattern.split('.').count();
    if words > limits.max_pattern_words {
        return Err(BindingError::TooManyWords {
            index,
            words,
            max: limits.max_pattern_words,
        });
    }
    let hashes = pattern.split('.').filter(|w| *w == "#").count();
    if hashes > limits.max_pattern_hashes {
        return Err(BindingError::TooManyHashes {
            index,
            hashes,
            max: limits.max_pattern_hashes,
        });
    }
    Ok(())
}

fn check_allowed(exchange: &str, limits: &Limits) -> Result<(), BindingError> {
    let prefixes = &limits.allowed_exchange_prefixes;
    if prefixes.is_empty() || prefixes.iter().any(|p| exchange.starts_with(p.as_str())) {
        return Ok(());
    }
    let allowed = prefixes
        .iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(" or ");
    Err(BindingError::NotAllowed {
        exchange: exchange.to_owned(),
        allowed,
    })
}

/// Imitates the message of V8's `JSON.parse` (what the original service sent), e.g.
/// `Unexpected token 'h', "this is not json" is not valid JSON`. Long inputs are quoted
/// around the error position only, as V8 does (10 characters either side).
fn v8_json_error(text: &str, err: &serde_json::Error) -> String {
    const CONTEXT: usize = 10;
    if err.is_eof() {
        return "Unexpected end of JSON input".to_owned();
    }
    if err.to_string().starts_with("recursion limit exceeded") {
        return "JSON nested too deeply (at most 128 levels)".to_owned();
    }
    let chars: Vec<char> = text.chars().collect();
    let pos = char_position(text, err.line(), err.column()).min(chars.len().saturating_sub(1));
    let token = chars.get(pos).copied().unwrap_or(' ');
    let slice = |from: usize, to: usize| chars[from..to].iter().collect::<String>();
    let quoted = if chars.len() < CONTEXT * 2 + 1 {
        format!("\"{text}\"")
    } else if pos < CONTEXT {
        format!("\"{}\"...", slice(0, pos + CONTEXT))
    } else if pos >= chars.len() - CONTEXT {
        format!("...\"{}\"", slice(pos - CONTEXT, chars.len()))
    } else {
        format!("...\"{}\"...", slice(pos - CONTEXT, pos + CONTEXT))
    };
    format!("Unexpected token '{token}', {quoted} is not valid JSON")
}

/// serde_json reports 1-based line and column (in bytes); V8 counts characters.
fn char_position(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in text.split('\n').enumerate() {
        if i + 1 == line {
            let byte = column.saturating_sub(1).min(l.len());
            let byte = (0..=byte)
                .rev()
                .find(|b| l.is_char_boundary(*b))
                .unwrap_or(0);
            return text[..offset + byte].chars().count();
        }
        offset += l.len() + 1;
    }
    0
}

#[cfg(test)]
mod tests;
