//! One WebSocket connection: its protocol state, its subscriptions, its timers.
//!
//! Each subscription is a registry client like an SSE stream (same subscriptions, same
//! broker bindings, same frames, same limits) whose frames are read by a tap (`feed.rs`) at the
//! connection's pace instead of by a writer shard. The connection is one task: it reads
//! the client's frames, the subscriptions' frames, and its timers in one `select!`, and
//! writes in between, so a write never races another.
//!
//! Invariants:
//! - a subscription's frames reach the client in the log's order, each once; a
//!   subscription that falls behind the log's bounds (the client reads too slowly) ends
//!   the connection with an `error` frame and close 1013, never a silent gap, and never
//!   slows another client: the writers do not wait for a tap;
//! - no write waits longer than the stall timeout;
//! - whatever the client sends, the connection answers with a frame or a close, never a
//!   panic; dropping a subscription (unsubscribe, close) releases its registry membership
//!   and its share of the address's limits at once.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, sleep_until};
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::feed::{Event, Events, events};
use super::protocol::{self, Fatal, close};
use super::upgrade::Socket;
use super::{Context, Kind, named};
use crate::admission::Slot;
use crate::connect::{Refused, log_refusal};
use crate::message::FrameKind;

/// Most subscriptions one connection may hold (the UI holds one per socket).
pub const MAX_SUBSCRIPTIONS: usize = 100;
/// Most bytes of `data` frames encoded before they are written: each is the client's own
/// copy of its message, so a client that does not read holds at most this much of them.
const BATCH_BYTES: usize = 256 * 1024;

/// How a connection ends.
enum End {
    /// With a close frame.
    Close(u16, &'static str),
    /// Without one: the client is gone, or did not answer a ping, or does not read.
    Drop(&'static str),
}

pub(super) struct Session {
    ctx: Arc<Context>,
    kind: Kind,
    slot: Slot,
    /// The address the connection counts against (for logs).
    client: std::net::IpAddr,
    socket: Socket,
    subs: StreamMap<String, Events>,
    inited: bool,
    /// A frame or pong came since the last ping.
    alive: bool,
}

impl Session {
    pub(super) fn new(
        ctx: Arc<Context>,
        kind: Kind,
        slot: Slot,
        client: std::net::IpAddr,
        socket: Socket,
    ) -> Self {
        Self {
            ctx,
            kind,
            slot,
            client,
            socket,
            subs: StreamMap::new(),
            inited: false,
            alive: true,
        }
    }

    pub(super) async fn run(mut self) {
        let settings = self.ctx.settings;
        let draining = self.ctx.streams.draining.clone();
        let started = Instant::now();
        let init_deadline = started + settings.init_timeout;
        let lifetime_end = started + settings.lifetime;
        let mut ping =
            tokio::time::interval_at(started + settings.ping_interval, settings.ping_interval);
        // A ping late after a long write is one ping, not a burst that could pass the
        // client's pong by.
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                // The client's frames before the ping: a pong waiting to be read counts.
                biased;
                () = draining.cancelled() => {
                    break End::Close(close::RESTART, "The server is restarting; reconnect");
                }
                () = sleep_until(init_deadline), if !self.inited => {
                    break End::Close(close::PROTOCOL, Fatal::NoInit.reason());
                }
                () = sleep_until(lifetime_end) => {
                    break End::Close(close::LIFETIME, "Connection lifetime exceeded");
                }
                inbound = self.socket.next() => match inbound {
                    Some(Ok(msg)) => {
                        self.alive = true;
                        if let Some(end) = self.inbound(msg).await {
                            break end;
                        }
                    }
                    None | Some(Err(_)) => break End::Drop("client_gone"),
                },
                _ = ping.tick() => {
                    if !self.alive {
                        break End::Drop("missed_pong");
                    }
                    self.alive = false;
                    if !self.write(vec![Message::Ping(bytes::Bytes::new())]).await {
                        break End::Drop("stalled");
                    }
                }
                Some((id, event)) = self.subs.next(), if !self.subs.is_empty() => {
                    if let Some(end) = self.event(id, event).await {
                        break end;
                    }
                }
            }
        };
        self.finish(end).await;
    }

    /// A client frame; `Some` ends the connection.
    async fn inbound(&mut self, msg: Message) -> Option<End> {
        let parsed = match &msg {
            Message::Close(_) => return Some(End::Drop("client_closed")),
            Message::Text(text) => protocol::parse(text.as_str()),
            Message::Binary(bytes) => std::str::from_utf8(bytes)
                .map_err(|_| Fatal::MalformedJson)
                .and_then(protocol::parse),
            // Pings are answered by the WebSocket layer; pongs only show the client is there.
            _ => return None,
        };
        let frame = match parsed {
            Ok(frame) => frame,
            Err(fatal) => return Some(End::Close(close::PROTOCOL, fatal.reason())),
        };
        if !self.inited {
            if frame.kind != "connection_init" {
                return Some(End::Close(close::PROTOCOL, Fatal::NotInitFirst.reason()));
            }
            // `authorization` is not checked: the gateway serves public Pulse messages to
            // anyone, as its SSE endpoint does (see the README).
            self.inited = true;
            return self.send(protocol::CONNECTION_ACK.to_owned()).await;
        }
        match frame.kind.as_str() {
            "subscribe" => {
                let answer = match self.subscribe(&frame.fields) {
                    Ok(id) => protocol::subscribe_ack(&id),
                    Err((code, text)) => protocol::error(code, &text, None),
                };
                self.send(answer).await
            }
            "unsubscribe" => {
                // No answer, and an id that is not this connection's is ignored.
                if let Some(serde_json::Value::String(id)) = frame.fields.get("subscriptionId") {
                    self.drop_subscription(id);
                }
                None
            }
            other => {
                let text = format!("Unknown frame type: {other}");
                self.send(protocol::error("ProtocolError", &text, None))
                    .await
            }
        }
    }

    /// Subscribes to the bindings of a subscribe frame: the subscription's id, or the
    /// error frame's code and text.
    fn subscribe(
        &mut self,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, (&'static str, String)> {
        let protocol_error = |text: String| ("ProtocolError", text);
        let streams = &self.ctx.streams;
        let set = match self.kind {
            Kind::Raw => {
                let pairs = protocol::raw_bindings(fields).map_err(protocol_error)?;
                crate::binding::check_pairs(pairs.into_iter(), &streams.limits)
            }
            Kind::Named => {
                let pairs = named::resolve(fields).map_err(protocol_error)?;
                let pairs = pairs.iter().map(|(e, p)| (e.as_str(), p.as_str()));
                crate::binding::check_pairs(pairs.collect::<Vec<_>>().into_iter(), &streams.limits)
            }
        }
        .map_err(|err| {
            if err.is_pattern_limit() {
                streams.metrics.refused("pattern");
            }
            protocol_error(err.to_string())
        })?;
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return Err((
                "LimitExceeded",
                format!(
                    "At most {MAX_SUBSCRIPTIONS} subscriptions per connection; unsubscribe one first"
                ),
            ));
        }
        let key = self.slot.client();
        let client = self.client;
        let refused = |refusal: &dyn Refused| {
            streams.metrics.refused(refusal.reason());
            log_refusal(refusal, client);
            ("LimitExceeded", refusal.to_string())
        };
        let mut share = self.slot.new_share();
        share.hold(&set).map_err(|over| refused(&over))?;
        let mut client = streams
            .registry
            .subscribe(set, || streams.admission.allow_new_subscription(key))
            .map_err(|refusal| refused(&refusal))?;
        client.charge(Box::new(share));
        let ready = client.ready(streams.settings.ready_timeout);
        let internal = || ("InternalError", "Internal error subscribing".to_owned());
        let (member, subscription, pinned_at) = client.into_stream().ok_or_else(internal)?;
        let tap = subscription.tap(pinned_at);
        let id = protocol::subscription_id();
        self.subs.insert(id.clone(), events(tap, member, ready));
        self.ctx.metrics().websocket_subscriptions.inc();
        Ok(id)
    }

    /// What a subscription said; `Some` ends the connection.
    async fn event(&mut self, id: String, event: Event) -> Option<End> {
        let frames = match event {
            Event::Bound(Ok(())) => return None,
            Event::Bound(Err(err)) => {
                self.drop_subscription(&id);
                let text = format!("Error binding queue: {err}");
                return self
                    .send(protocol::error("SubscriptionError", &text, Some(&id)))
                    .await;
            }
            Event::Lagged(missed) => {
                self.ctx.metrics().dropped("slow_client", missed);
                let text = format!(
                    "This connection reads too slowly: {missed} messages were dropped; reconnect"
                );
                let _ = self
                    .write(vec![Message::text(protocol::error(
                        "SlowClient",
                        &text,
                        Some(&id),
                    ))])
                    .await;
                return Some(End::Close(close::SLOW, "Too slow"));
            }
            Event::Frames(frames) => frames,
        };
        let mut out = Vec::with_capacity(frames.len());
        let mut bytes = 0;
        let mut delivered = 0;
        let mut ended = false;
        let mut drained = false;
        for frame in &frames {
            if bytes >= BATCH_BYTES {
                if !self.write(std::mem::take(&mut out)).await {
                    return Some(End::Drop("stalled"));
                }
                bytes = 0;
            }
            match frame.kind {
                FrameKind::Message => {
                    if let Some(text) = protocol::data(&id, frame) {
                        bytes += text.len();
                        out.push(Message::text(text));
                        delivered += 1;
                    }
                }
                FrameKind::Missed => out.push(Message::text(protocol::error(
                    "MessagesMissed",
                    "Messages may have been missed: the broker queue was lost and re-created",
                    Some(&id),
                ))),
                FrameKind::Comment => {}
                FrameKind::End => {
                    let text = protocol::error_text(&frame.bytes);
                    out.push(Message::text(protocol::error(
                        "SubscriptionError",
                        &text,
                        Some(&id),
                    )));
                    ended = true;
                    break;
                }
                FrameKind::Drain => {
                    // The frames before the marker go out first.
                    drained = true;
                    break;
                }
            }
        }
        if ended {
            self.drop_subscription(&id);
        }
        self.ctx.metrics().websocket_messages.inc_by(delivered);
        self.ctx.metrics().messages_delivered.inc_by(delivered);
        if !self.write(out).await {
            return Some(End::Drop("stalled"));
        }
        drained.then_some(End::Close(
            close::RESTART,
            "The server is restarting; reconnect",
        ))
    }

    fn drop_subscription(&mut self, id: &str) {
        if self.subs.remove(id).is_some() {
            self.ctx.metrics().websocket_subscriptions.dec();
        }
    }

    /// Sends one text frame; `Some` if the connection must end (the write stalled).
    async fn send(&mut self, text: String) -> Option<End> {
        match self.write(vec![Message::text(text)]).await {
            true => None,
            false => Some(End::Drop("stalled")),
        }
    }

    /// Writes `messages` and flushes, within the stall timeout. Returns whether it did.
    async fn write(&mut self, messages: Vec<Message>) -> bool {
        if messages.is_empty() {
            return true;
        }
        let socket = &mut self.socket;
        let all = async {
            for msg in messages {
                socket.feed(msg).await?;
            }
            socket.flush().await
        };
        let closing = self.ctx.closing.clone();
        tokio::select! {
            written = tokio::time::timeout(self.ctx.streams.settings.stall_timeout, all) => {
                matches!(written, Ok(Ok(())))
            }
            // The drain stopped waiting: a session still writing is cut.
            () = closing.cancelled() => false,
        }
    }

    async fn finish(mut self, end: End) {
        let metrics = self.ctx.metrics().clone();
        let left = self.subs.len() as i64;
        // Subscriptions first: their memberships leave the registry at once.
        drop(std::mem::take(&mut self.subs));
        metrics.websocket_subscriptions.sub(left);
        let label = match end {
            End::Close(code, reason) => {
                let frame = CloseFrame {
                    code: code.into(),
                    reason: reason.into(),
                };
                let bye = self.socket.close(Some(frame));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
                code_label(code)
            }
            End::Drop(why) => {
                if why == "client_closed" {
                    // Sends the close frame the WebSocket layer queued in answer.
                    let bye = SinkExt::close(&mut self.socket);
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
                }
                why
            }
        };
        metrics.websocket_closed(label);
        drop(self.slot);
    }
}

/// The metric label of a close code.
fn code_label(code: u16) -> &'static str {
    match code {
        close::PROTOCOL => "4400",
        close::LIFETIME => "4408",
        close::RESTART => "1012",
        close::SLOW => "1013",
        _ => "other",
    }
}
