//! The stream rule, checked on a client's bytes as they arrive: a stream is its
//! subscription's messages in order from where the client started, each exactly once,
//! or one notice covering exactly the messages it skipped (the "N messages were dropped"
//! comment on a plain stream, `gap` with `missed` on a resumable one).
//!
//! The messages must carry their number as the first payload field (`{"n": N, ...}`),
//! published 0, 1, 2, ... on one exchange.

use crate::find;

/// The body of an HTTP/1.1 chunked response, taken apart as it arrives.
#[derive(Default)]
pub struct Dechunk {
    buf: Vec<u8>,
    /// Bytes left of the chunk being read, and whether its CRLF is still to come.
    in_chunk: Option<usize>,
    /// The last chunk was read.
    pub done: bool,
}

impl Dechunk {
    /// Adds `bytes`; returns the body data they complete. Panics if the framing breaks.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.done {
            // The CRLF after the last chunk (no trailers are sent).
            return Vec::new();
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            match self.in_chunk {
                Some(left) if left > 0 => {
                    let n = left.min(self.buf.len());
                    out.extend_from_slice(&self.buf[..n]);
                    self.buf.drain(..n);
                    self.in_chunk = Some(left - n);
                    if n == 0 {
                        return out;
                    }
                }
                Some(_) => {
                    if self.buf.len() < 2 {
                        return out;
                    }
                    assert_eq!(&self.buf[..2], b"\r\n", "a chunk must end with CRLF");
                    self.buf.drain(..2);
                    self.in_chunk = None;
                }
                None => {
                    let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                        return out;
                    };
                    let size = std::str::from_utf8(&self.buf[..end])
                        .ok()
                        .and_then(|h| usize::from_str_radix(h, 16).ok())
                        .unwrap_or_else(|| {
                            panic!(
                                "bad chunk size line {:?}",
                                String::from_utf8_lossy(&self.buf[..end.min(40)])
                            )
                        });
                    self.buf.drain(..end + 2);
                    if size == 0 {
                        self.done = true;
                        return out;
                    }
                    self.in_chunk = Some(size);
                }
            }
        }
    }
}

/// A client's stream checked against the rule as it arrives (see the module doc).
pub struct StreamRule {
    /// The number of the next message due.
    pub next: u64,
    /// Messages received.
    pub received: u64,
    /// Messages the notices said were dropped.
    pub missed: u64,
    /// Notices received.
    pub notices: u64,
    /// What broke the rule (the first few).
    pub violations: Vec<String>,
    /// Whether notices come as `gap` events (resumable) or comments (plain).
    resumable: bool,
    /// Bytes of an event not complete yet.
    pending: Vec<u8>,
}

impl StreamRule {
    /// A stream whose first message due is number `first`.
    pub fn new(first: u64, resumable: bool) -> Self {
        Self {
            next: first,
            received: 0,
            missed: 0,
            notices: 0,
            violations: Vec::new(),
            resumable,
            pending: Vec::new(),
        }
    }

    /// Adds SSE text (the body, after the head and any chunk framing).
    pub fn feed(&mut self, text: &[u8]) {
        self.pending.extend_from_slice(text);
        let pending = std::mem::take(&mut self.pending);
        let mut start = 0;
        while let Some(end) = find(&pending[start..], b"\n\n") {
            let event = String::from_utf8_lossy(&pending[start..start + end]);
            self.event(&event);
            start += end + 2;
        }
        self.pending = pending;
        self.pending.drain(..start);
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 10 {
            self.violations.push(what);
        }
    }

    fn event(&mut self, event: &str) {
        let data = event.lines().find_map(|l| l.strip_prefix("data: "));
        if let Some(comment) = event.strip_prefix(": ") {
            let count = comment
                .strip_suffix(" messages were dropped because this client reads too slowly")
                .and_then(|n| n.parse::<u64>().ok());
            match count {
                Some(n) if !self.resumable && n > 0 => self.skip(n),
                _ => self.violation(format!("unexpected comment {event:?}")),
            }
        } else if event.starts_with("event: gap\n") {
            let missed = data
                .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                .and_then(|v| v["missed"].as_u64());
            match missed {
                Some(n) if self.resumable && n > 0 => self.skip(n),
                _ => self.violation(format!("unexpected gap {event:?}")),
            }
        } else if event.starts_with("event: message\n") {
            let n = data
                .and_then(|d| d.strip_prefix("{\"payload\":{\"n\":"))
                .map(|d| {
                    d.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .and_then(|d| d.parse::<u64>().ok());
            match n {
                Some(n) if n == self.next => {
                    self.next += 1;
                    self.received += 1;
                }
                Some(n) => {
                    let due = self.next;
                    self.violation(format!("message {n} where {due} was due"));
                    self.next = n + 1;
                }
                None => self.violation(format!("a message without its number: {event:.80?}")),
            }
        } else if !(event.starts_with("event: ping\n") || event.starts_with("event: ready\n")) {
            self.violation(format!("unexpected event {event:.120?}"));
        }
    }

    fn skip(&mut self, n: u64) {
        self.next += n;
        self.missed += n;
        self.notices += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_takes_chunks_apart_across_reads() {
        let mut d = Dechunk::default();
        let body = b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut out = Vec::new();
        for b in body.chunks(2) {
            out.extend(d.feed(b));
        }
        assert_eq!(out, b"helloabc");
        assert!(d.done);
    }

    #[test]
    fn the_rule_sees_duplicates_gaps_and_notices() {
        let msg =
            |n: u64| format!("event: message\ndata: {{\"payload\":{{\"n\":{n}}}}}\nid: -\n\n");
        let mut ok = StreamRule::new(0, false);
        ok.feed(format!("{}{}", msg(0), msg(1)).as_bytes());
        ok.feed(b": 3 messages were dropped because this client reads too slowly\n\n");
        ok.feed(msg(5).as_bytes());
        assert!(ok.violations.is_empty(), "{:?}", ok.violations);
        assert_eq!((ok.received, ok.missed, ok.next), (3, 3, 6));

        let mut dup = StreamRule::new(0, false);
        dup.feed(format!("{}{}{}", msg(0), msg(1), msg(1)).as_bytes());
        assert_eq!(dup.violations.len(), 1);
        let mut silent_gap = StreamRule::new(0, false);
        silent_gap.feed(format!("{}{}", msg(0), msg(2)).as_bytes());
        assert_eq!(silent_gap.violations.len(), 1);
        let mut wrong_count = StreamRule::new(0, true);
        wrong_count.feed(b"event: gap\ndata: {\"reason\":\"slow\",\"missed\":2}\nid: x\n\n");
        wrong_count.feed(msg(3).as_bytes());
        assert_eq!(wrong_count.violations.len(), 1);
    }
}
