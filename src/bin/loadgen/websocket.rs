//! Clients of Taskcluster's WebSocket protocol (`/subscription/raw`): each opens a
//! connection, sends `connection_init`, subscribes after the ack, counts `subscribe_ack`
//! as ready, and records every `data` frame as the SSE clients record messages.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::client::{Client, Seen, now_ns, number_after};

pub async fn connect(
    gateway: SocketAddr,
    source: IpAddr,
    subscribe: String,
    pattern: usize,
    received: Arc<AtomicU64>,
) -> anyhow::Result<Client> {
    let started = Instant::now();
    let stream = crate::client::dial(gateway, source).await?;
    let request = format!("ws://{gateway}/subscription/raw").into_client_request()?;
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    ws.send(Message::text(r#"{"type":"connection_init"}"#))
        .await?;
    let mut subscribed = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed before subscribe_ack"))??;
        let Message::Text(text) = msg else { continue };
        if text.contains(r#""type":"connection_ack""#) && !subscribed {
            ws.send(Message::text(subscribe.clone())).await?;
            subscribed = true;
        } else if text.contains(r#""type":"subscribe_ack""#) {
            break;
        } else if text.contains(r#""type":"error""#) {
            anyhow::bail!("error: {text}");
        }
    }
    let ready_after = started.elapsed();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let frame = text.as_bytes();
            if let (Some(seq), Some(ts)) = (
                number_after(frame, b"\"seq\":"),
                number_after(frame, b"\"ts\":"),
            ) {
                record
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(seq, ts, now_ns());
                received.fetch_add(1, Ordering::Relaxed);
            } else if text.contains(r#""code":"SlowClient""#) {
                // The gateway closes a client that fell behind; the lost messages show as
                // missing.
                break;
            }
        }
    });
    Ok(Client {
        pattern,
        ready_after,
        seen,
        task,
    })
}
