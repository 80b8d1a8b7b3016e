//! Integration tests: each starts the real gateway on a free port and talks HTTP to it,
//! with a real RabbitMQ behind it (127.0.0.1:5672, guest/guest; TEST_AMQP_URL and
//! TEST_RABBITMQCTL point them at another, as scripts/test.sh does for RabbitMQ 4.3).
//! Without RabbitMQ they fail and say how to start it.

mod abuse;
mod brokers;
mod drain;
mod embedded;
mod fanout;
mod integrity;
mod limits;
mod protocol;
mod proxy;
mod replicas;
mod resilience;
mod resume;
mod sharing;
mod topic;
mod websocket;
