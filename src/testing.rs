//! Helpers for the crate's unit tests (the integration tests have `tests/support`).

use tokio::net::{TcpListener, TcpStream};

/// A connected pair of loopback sockets: (the gateway's side, the client's side).
pub async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (server, client)
}
