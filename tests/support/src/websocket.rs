//! A client of the WebSocket endpoints (Taskcluster's protocol), frame by frame.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

/// What the server sent next.
#[derive(Debug, PartialEq)]
pub enum WsEvent {
    /// A JSON text frame.
    Frame(Value),
    /// A close frame: code and reason.
    Closed(u16, String),
    /// The connection ended without a close frame.
    Gone,
    /// Nothing within the time allowed.
    Silent,
}

/// One WebSocket connection.
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
}

impl WsClient {
    /// Opens `path` (`/subscription/raw` or `/named`) from 127.0.0.1; `Err(status)` if the
    /// handshake was refused, `Err(0)` if the connection failed (nothing listens, or it
    /// was closed during the handshake).
    pub async fn open(addr: SocketAddr, path: &str, origin: Option<&str>) -> Result<Self, u16> {
        Self::open_from(IpAddr::from([127, 0, 0, 1]), addr, path, origin).await
    }

    /// The same from source address `source` (any 127.x.y.z).
    pub async fn open_from(
        source: IpAddr,
        addr: SocketAddr,
        path: &str,
        origin: Option<&str>,
    ) -> Result<Self, u16> {
        Self::open_with(source, addr, path, origin, None).await
    }

    /// `ready`, with a small receive buffer: a client that stops reading holds little in
    /// its socket, so the gateway's side fills soon.
    pub async fn ready_with_receive_buffer(addr: SocketAddr, path: &str, bytes: u32) -> Self {
        let local = IpAddr::from([127, 0, 0, 1]);
        let client = Self::open_with(local, addr, path, None, Some(bytes)).await;
        client.expect("handshake").init().await
    }

    async fn open_with(
        source: IpAddr,
        addr: SocketAddr,
        path: &str,
        origin: Option<&str>,
        receive_buffer: Option<u32>,
    ) -> Result<Self, u16> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(bytes) = receive_buffer {
            socket.set_recv_buffer_size(bytes).expect("receive buffer");
        }
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        let Ok(stream) = socket.connect(addr).await else {
            return Err(0);
        };
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("request");
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().expect("origin header"));
        }
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(_) => Err(0),
        }
    }

    /// Opens `path` and sends `connection_init`, expecting the ack.
    pub async fn ready(addr: SocketAddr, path: &str) -> Self {
        let client = Self::open(addr, path, None).await.expect("handshake");
        client.init().await
    }

    /// Sends `connection_init`, expecting the ack.
    async fn init(mut self) -> Self {
        self.send(json!({"type": "connection_init"})).await;
        let ack = self.next(Duration::from_secs(5)).await;
        assert_eq!(ack, WsEvent::Frame(json!({"type": "connection_ack"})));
        self
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_owned()))
            .await
            .expect("send a frame");
    }

    /// The next frame, close or end within `within` (pings and pongs skipped).
    pub async fn next(&mut self, within: Duration) -> WsEvent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return WsEvent::Silent,
                Ok(None) | Ok(Some(Err(_))) => return WsEvent::Gone,
                Ok(Some(Ok(msg))) => msg,
            };
            match msg {
                Message::Text(text) => {
                    let value = serde_json::from_str(text.as_str()).expect("a JSON frame");
                    return WsEvent::Frame(value);
                }
                Message::Close(Some(frame)) => {
                    return WsEvent::Closed(u16::from(frame.code), frame.reason.to_string());
                }
                Message::Close(None) => return WsEvent::Closed(1005, String::new()),
                _ => continue,
            }
        }
    }

    /// The next frame, which must be a JSON frame.
    pub async fn frame(&mut self) -> Value {
        match self.next(Duration::from_secs(10)).await {
            WsEvent::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Subscribes with `frame` (a subscribe frame) and returns the subscription's id.
    pub async fn subscribe(&mut self, frame: Value) -> String {
        self.send(frame).await;
        let ack = self.frame().await;
        assert_eq!(ack["type"], "subscribe_ack", "{ack}");
        ack["subscriptionId"]
            .as_str()
            .expect("a subscription id")
            .to_owned()
    }

    /// The next `data` frame's message, for subscription `id`.
    pub async fn message(&mut self, id: &str) -> Value {
        let frame = self.frame().await;
        assert_eq!(frame["type"], "data", "{frame}");
        assert_eq!(frame["subscriptionId"], id, "{frame}");
        frame["message"].clone()
    }
}

/// A raw subscribe frame for `bindings`.
pub fn raw_subscribe(bindings: &[(&str, &str)]) -> Value {
    let bindings: Vec<Value> = bindings
        .iter()
        .map(|(exchange, pattern)| json!({"exchange": exchange, "pattern": pattern}))
        .collect();
    json!({"type": "subscribe", "bindings": bindings})
}
