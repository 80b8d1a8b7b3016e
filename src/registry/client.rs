//! A client of the registry: its membership of a subscription (which holds its charge on
//! its address's share), its pinned position in the subscription's log, and the broker
//! state of its bindings until `ready`.
//!
//! Invariant: a client reads every frame sent after it subscribed: its position is pinned
//! from [`Registry::subscribe`](super::Registry::subscribe) until its stream is attached to
//! a writer ([`Client::attach`]) or it leaves; dropping it (or its membership, once
//! streaming) leaves the subscription.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Registry;
use crate::subscription::{Gap, Lease, Subscription};
use crate::topology::{BindError, BindState};

/// A client's membership of a subscription; dropping it leaves the subscription (the
/// last member to leave removes it).
pub struct Member {
    registry: Arc<Registry>,
    subscription: Arc<Subscription>,
    /// What the client holds of its address's share (see [`Client::charge`]).
    charge: Option<Lease>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.registry
            .release(&self.subscription, self.charge.take());
    }
}

/// A client that subscribed and is not streaming yet: its membership, its pinned position
/// in the log, and the broker state of its bindings. Dropping it leaves the subscription.
pub struct Client {
    /// `None` once attached.
    member: Option<Member>,
    pinned_at: u64,
    statuses: Vec<watch::Receiver<BindState>>,
}

impl Client {
    pub(super) fn new(
        registry: Arc<Registry>,
        subscription: Arc<Subscription>,
        pinned_at: u64,
        statuses: Vec<watch::Receiver<BindState>>,
    ) -> Self {
        Self {
            member: Some(Member {
                registry,
                subscription,
                charge: None,
            }),
            pinned_at,
            statuses,
        }
    }

    /// The subscription joined.
    pub fn subscription(&self) -> Option<&Arc<Subscription>> {
        self.member.as_ref().map(|m| &m.subscription)
    }

    /// Holds `charge` (what the client holds of its address's share) with the membership:
    /// given back when the client leaves, or kept by the subscription while it lingers.
    pub fn charge(&mut self, charge: Lease) {
        if let Some(member) = &mut self.member {
            member.charge = Some(charge);
        }
    }

    /// The log position the client reads from (every frame sent after it subscribed).
    pub fn position(&self) -> u64 {
        self.pinned_at
    }

    /// A resumable client that reconnects with `last_event_id`: it reads from just after
    /// that position if the subscription still holds every frame since; otherwise it
    /// stays live, and is told why.
    pub fn resume(&mut self, last_event_id: &str) -> Result<(), Gap> {
        let member = self.member.as_ref().ok_or(Gap::Invalid)?;
        self.pinned_at = member.subscription.resume(self.pinned_at, last_event_id)?;
        Ok(())
    }

    /// The client goes on to stream: its membership (which its stream must hold for as
    /// long as it streams), its subscription and its pinned position, which stays pinned
    /// until the stream is attached to the subscription's writers
    /// ([`Subscription::attach`]).
    pub fn into_stream(mut self) -> Option<(Member, Arc<Subscription>, u64)> {
        let member = self.member.take()?;
        let subscription = member.subscription.clone();
        Some((member, subscription, self.pinned_at))
    }

    /// Waits until the broker has confirmed every binding, or one was refused, or
    /// `timeout` passed.
    pub fn ready(
        &self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), BindError>> + Send + 'static {
        let mut statuses = self.statuses.clone();
        async move {
            let all = async {
                for status in &mut statuses {
                    let state = status
                        .wait_for(|s| *s != BindState::Pending)
                        .await
                        .map_err(|_| BindError::Internal)?;
                    if let BindState::Failed(err) = &*state {
                        return Err(err.clone());
                    }
                }
                Ok(())
            };
            tokio::time::timeout(timeout, all)
                .await
                .unwrap_or(Err(BindError::Timeout))
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(member) = &self.member {
            member.subscription.unpin(self.pinned_at);
        }
    }
}
