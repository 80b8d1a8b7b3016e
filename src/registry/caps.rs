//! The registry's bounds on what clients may make the gateway (and the broker) hold,
//! and why a subscription was refused.

use crate::topology::{NoRoom, Room};

/// Global bounds on what clients may make the gateway (and the broker) hold.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Distinct subscriptions (binding sets) at once (MAX_SUBSCRIPTIONS).
    pub max_subscriptions: usize,
    /// Distinct (exchange, pattern) bindings at once, each one broker binding
    /// (MAX_BROKER_BINDINGS).
    pub max_bindings: usize,
    /// Exchanges in use at once, each one queue, one reconciler and two AMQP channels
    /// (MAX_EXCHANGES).
    pub max_exchanges: usize,
    /// Resumable subscriptions lingering with no client at once
    /// (MAX_LINGERING_SUBSCRIPTIONS); the oldest goes first.
    pub max_lingering: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_subscriptions: 20_000,
            max_bindings: 20_000,
            max_exchanges: 200,
            max_lingering: 2_000,
        }
    }
}

/// Why a new subscription was not created. `Display` is the text sent to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Too many new subscriptions from your address; try again in a few seconds")]
    AddressRate,
    #[error(
        "This server has reached its limit of {0} distinct subscriptions; try again later, or use bindings other clients already use"
    )]
    Subscriptions(usize),
    #[error("This server has reached its limit of {0} distinct bindings; try again later")]
    Bindings(usize),
    #[error("This server has reached its limit of {0} exchanges in use; try again later")]
    Exchanges(usize),
}

impl Refusal {
    /// The reason label of `events_gateway_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::AddressRate => "address_rate",
            Refusal::Subscriptions(_) => "subscriptions",
            Refusal::Bindings(_) => "bindings",
            Refusal::Exchanges(_) => "exchanges",
        }
    }
}

impl Caps {
    /// What the topology may route.
    pub(super) fn room(&self) -> Room {
        Room {
            max_bindings: self.max_bindings,
            max_exchanges: self.max_exchanges,
        }
    }

    /// The refusal a client gets when the topology has no room.
    pub(super) fn refusal(&self, no_room: NoRoom) -> Refusal {
        match no_room {
            NoRoom::Bindings => Refusal::Bindings(self.max_bindings),
            NoRoom::Exchanges => Refusal::Exchanges(self.max_exchanges),
        }
    }
}
