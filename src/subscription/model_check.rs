//! What the model test (`model_tests`) checks: each client's bytes dechunk (HTTP/1.1)
//! and parse (SSE) into a stream that obeys the stream rule (see `cursor`): the
//! subscription's frames in order from the client's own position, each exactly once, or
//! one notice covering exactly the frames it skipped; a stream that must end ends with the
//! frame that ends it; a client still connected at the end has reached the end.

use proptest::prelude::*;

use super::model_tests::ClientSpec;

/// What a case did: each client's bytes, start position and end state; the log's end;
/// the positions of the frames that end streams.
pub(super) struct Outcome {
    pub(super) clients: Vec<Received>,
    pub(super) head: u64,
    pub(super) ends: Vec<u64>,
    pub(super) epoch_key: String,
}

pub(super) struct Received {
    pub(super) spec: ClientSpec,
    pub(super) bytes: Vec<u8>,
    pub(super) start: u64,
    /// The gateway still holds the connection.
    pub(super) connected: bool,
    /// The gateway ended the stream (closed its sending side).
    pub(super) shut: bool,
}

/// The data of an HTTP/1.1 chunked body; `Err` if the framing breaks. A body cut off
/// mid-chunk (a client that left) gives what came before the cut.
fn dechunk(mut body: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let mut data = Vec::new();
    while !body.is_empty() {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok((data, false));
        };
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| format!("bad chunk size {:?}", &body[..line_end.min(20)]))?;
        let rest = &body[line_end + 2..];
        if rest.len() < size + 2 {
            return Ok((data, false));
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".to_owned());
        }
        if size == 0 {
            return Ok((data, true));
        }
        data.extend_from_slice(&rest[..size]);
        body = &rest[size + 2..];
    }
    Ok((data, true))
}

/// Checks one client's stream against the stream rule; returns the position it reached
/// and whether the stream ended with a frame that ends it.
fn check_stream(
    text: &str,
    start: u64,
    resumable: bool,
    outcome: &Outcome,
) -> Result<(u64, bool), String> {
    let epoch_key = outcome.epoch_key.as_str();
    let mut at = start;
    let mut ended = false;
    let id_of = |event: &str| -> Option<u64> {
        let id = event.lines().find_map(|l| l.strip_prefix("id: "))?;
        id.strip_prefix(epoch_key)?.parse().ok()
    };
    let events: Vec<&str> = text.split("\n\n").collect();
    // The text after the last "\n\n" is an event cut off by a client that left.
    for event in &events[..events.len().saturating_sub(1)] {
        if ended {
            return Err(format!("{event:?} after the end of the stream"));
        }
        if let Some(rest) = event.strip_prefix("event: error\ndata: ") {
            let n: u64 = rest
                .split('\n')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad error {event:?}"))?;
            if n != at {
                return Err(format!("error {n} where {at} was due"));
            }
            at += 1;
            ended = true;
        } else if event.starts_with("event: reconnect\ndata: {}\n") {
            if !outcome.ends.contains(&at) {
                return Err(format!("reconnect frame at {at}, where no drain was sent"));
            }
            let id_ok = match resumable {
                true => !event.contains("\nid"),
                false => event.contains("\nid:\nretry: "),
            };
            if !id_ok {
                return Err(format!("reconnect frame with a wrong id: {event:?}"));
            }
            at += 1;
            ended = true;
        } else if let Some(rest) = event.strip_prefix(": note ") {
            let n: u64 = rest.parse().map_err(|_| format!("bad note {event:?}"))?;
            if n != at {
                return Err(format!("comment {n} where {at} was due"));
            }
            at += 1;
        } else if let Some(rest) = event.strip_prefix(": missed ") {
            let n: u64 = rest.parse().map_err(|_| format!("bad notice {event:?}"))?;
            if resumable || n != at {
                return Err(format!(
                    "missed notice {n} at {at} (resumable: {resumable})"
                ));
            }
            at += 1;
        } else if event.starts_with("event: gap\ndata: {\"reason\":\"broker\"}\n") {
            if !resumable || id_of(event) != Some(at) {
                return Err(format!(
                    "broker gap at {at}: {event:?} (resumable: {resumable})"
                ));
            }
            at += 1;
        } else if let Some(rest) = event.strip_prefix(": ") {
            let missed: u64 = rest
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad notice {event:?}"))?;
            if resumable || missed == 0 {
                return Err(format!("unexpected notice {event:?}"));
            }
            at += missed;
        } else if event.starts_with("event: gap\n") {
            if !resumable {
                return Err("gap on a plain stream".to_owned());
            }
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .ok_or("gap without data")?;
            let json: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            let missed = json["missed"].as_u64().ok_or("gap without missed")?;
            if missed == 0 {
                return Err("gap of nothing".to_owned());
            }
            at += missed;
            if id_of(event) != Some(at - 1) {
                return Err(format!("gap {event:?} does not name position {}", at - 1));
            }
        } else if event.starts_with("event: message\n") {
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .ok_or("message without data")?;
            let json: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            let n = json["n"].as_u64().ok_or("message without n")?;
            if n != at {
                return Err(format!("message {n} where {at} was due"));
            }
            let id_ok = match resumable {
                true => id_of(event) == Some(n),
                false => event.ends_with("\nid: -"),
            };
            if !id_ok {
                return Err(format!("message {n} with a wrong id: {event:?}"));
            }
            at += 1;
        } else if event.starts_with("event: ping\n") {
            let id_ok = match resumable {
                true => id_of(event) == Some(at - 1),
                false => event.ends_with("\nid: -"),
            };
            if !id_ok {
                return Err(format!("ping at {at} with a wrong id: {event:?}"));
            }
        } else {
            return Err(format!("unexpected event {event:?}"));
        }
    }
    Ok((at, ended))
}

/// Checks what every client of a case received (see the module doc).
pub(super) fn check_outcome(outcome: &Outcome) -> Result<(), TestCaseError> {
    for (i, client) in outcome.clients.iter().enumerate() {
        let spec = &client.spec;
        let (data, whole) =
            dechunk(&client.bytes).map_err(|e| TestCaseError::fail(format!("client {i}: {e}")))?;
        let text = String::from_utf8(data)
            .map_err(|_| TestCaseError::fail(format!("client {i}: not UTF-8")))?;
        let (reached, ended) = check_stream(&text, client.start, spec.resumable, outcome)
            .map_err(|e| TestCaseError::fail(format!("client {i} ({spec:?}): {e}")))?;
        let must_end = outcome.ends.iter().any(|at| *at >= client.start);
        prop_assert!(
            !client.shut || ended,
            "client {} ({:?}) was ended without its end frame",
            i,
            spec
        );
        prop_assert!(
            !(must_end && client.connected),
            "client {} ({:?}) is still streaming past a frame that ends it",
            i,
            spec
        );
        if client.connected {
            prop_assert!(whole, "client {i}: a chunk was cut off");
            prop_assert!(
                text.is_empty() || text.ends_with("\n\n"),
                "client {i}: an event was cut off"
            );
            prop_assert_eq!(
                reached,
                outcome.head,
                "client {} ({:?}) did not reach the end",
                i,
                spec
            );
        }
    }
    Ok(())
}
