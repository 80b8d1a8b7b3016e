//! Helpers shared by events-gateway's integration test binaries, by concept:
//! - [`broker`]: the broker the tests run against (TEST_AMQP_URL), a test's own AMQP
//!   connection, the broker's own view (TEST_RABBITMQCTL);
//! - [`gateway`]: a gateway in the test process or in a child process;
//! - [`clients`]: SSE and raw HTTP clients, the connect query;
//! - [`stream_rule`]: the stream rule, checked on a client's bytes;
//! - [`wait`]: conditions with deadlines;
//! - [`websocket`]: a client of the WebSocket endpoints, frame by frame.
//!
//! A crate of its own (a dev-dependency of the gateway) rather than a module included in
//! each binary: each binary uses the part it needs, and nothing needs `allow(dead_code)`.

pub mod broker;
pub mod clients;
pub mod gateway;
pub mod stream_rule;
pub mod wait;
pub mod websocket;

pub use broker::*;
pub use clients::*;
pub use gateway::*;
pub use stream_rule::{Dechunk, StreamRule};
pub use wait::*;
pub use websocket::*;
