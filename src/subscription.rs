//! A subscription: one distinct binding set and the broadcast channel its clients share.
//!
//! This is the type the registry (which creates and counts subscriptions) and the
//! topology (which routes deliveries to them) share; it sits below both, so that the layers
//! read top to bottom: http → registry → topology → subscription.
//!
//! Invariant: frames are sent as they are (shared `Bytes`), never re-encoded per client.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::broadcast;

use crate::binding::BindingSet;
use crate::message::Frame;

/// One distinct binding set and the broadcast channel its clients share.
pub struct Subscription {
    bindings: Arc<BindingSet>,
    sender: broadcast::Sender<Frame>,
    /// Clients holding this subscription; changed only under the registry's shard lock.
    pub(crate) clients: AtomicUsize,
}

impl Subscription {
    /// A subscription for `bindings` with one client, and a channel of `buffer` frames.
    pub(crate) fn new(bindings: Arc<BindingSet>, buffer: usize) -> Self {
        let (sender, _) = broadcast::channel(buffer);
        Self {
            bindings,
            sender,
            clients: AtomicUsize::new(1),
        }
    }

    pub fn bindings(&self) -> &BindingSet {
        &self.bindings
    }

    /// Sends a frame to every client; returns how many receivers it reached.
    pub(crate) fn send(&self, frame: Frame) -> usize {
        self.sender.send(frame).unwrap_or(0)
    }

    /// A new receiver of every frame sent from now on.
    pub(crate) fn receiver(&self) -> broadcast::Receiver<Frame> {
        self.sender.subscribe()
    }
}
