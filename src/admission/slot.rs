//! What one admitted connection holds: its slot among the connections of the process and
//! of its address, and its share (bindings, exchanges) of what its address may hold.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Admission, ClientKey, OverShare};
use crate::binding::BindingSet;

/// One open SSE connection, and (until it is taken) what it holds of its address's
/// share; dropping it frees both.
pub struct Slot {
    admission: Arc<Admission>,
    key: ClientKey,
    share: Option<Share>,
}

/// What one connection holds of its address's share: its bindings and exchanges.
/// Dropping it gives them back.
pub struct Share {
    admission: Arc<Admission>,
    key: ClientKey,
    bindings: usize,
    exchanges: Vec<Arc<str>>,
}

impl Slot {
    /// A slot counted against `key` (the caller counted it), holding nothing yet.
    pub(super) fn new(admission: Arc<Admission>, key: ClientKey) -> Self {
        Self {
            admission: admission.clone(),
            key,
            share: Some(Share {
                admission,
                key,
                bindings: 0,
                exchanges: Vec::new(),
            }),
        }
    }

    /// The address the connection counts against.
    pub fn client(&self) -> ClientKey {
        self.key
    }

    /// Counts `set` against the address's share, or says which share it would pass.
    pub fn hold(&mut self, set: &BindingSet) -> Result<(), OverShare> {
        match &mut self.share {
            Some(share) => share.hold(set),
            None => Ok(()),
        }
    }

    /// A new, empty share of the connection's address: a WebSocket connection holds one
    /// per subscription, with that subscription's membership.
    pub fn new_share(&self) -> Share {
        Share {
            admission: self.admission.clone(),
            key: self.key,
            bindings: 0,
            exchanges: Vec::new(),
        }
    }

    /// What the connection holds of its address's share, to be held elsewhere (with its
    /// subscription) from now on.
    pub fn take_share(&mut self) -> Option<Share> {
        self.share.take()
    }
}

impl Share {
    /// Counts `set` against the address's share, or says which share it would pass.
    pub fn hold(&mut self, set: &BindingSet) -> Result<(), OverShare> {
        let limits = &self.admission.limits;
        let Some(mut state) = self.admission.addresses.get_mut(&self.key) else {
            return Ok(());
        };
        if state.bindings + set.len() > limits.bindings_per_address {
            return Err(OverShare::Bindings(limits.bindings_per_address));
        }
        let mut wanted: Vec<&str> = set.iter().map(|b| b.exchange.as_str()).collect();
        wanted.dedup();
        let new = wanted
            .iter()
            .filter(|e| !state.exchanges.contains_key(**e))
            .count();
        if state.exchanges.len() + new > limits.exchanges_per_address {
            return Err(OverShare::Exchanges(limits.exchanges_per_address));
        }
        state.bindings += set.len();
        self.bindings = set.len();
        for exchange in wanted {
            let key = match state.exchanges.get_key_value(exchange) {
                Some((key, _)) => key.clone(),
                None => Arc::from(exchange),
            };
            *state.exchanges.entry(key.clone()).or_insert(0) += 1;
            self.exchanges.push(key);
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The share first: the address's state may go with the connection.
        drop(self.share.take());
        self.admission.release_connection(self.key);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let admission = self.admission.clone();
        admission.release_share(self);
    }
}

impl Admission {
    /// A connection closes: the address's state goes with its last connection if nothing
    /// else is charged to it and its bucket is full; otherwise it stays until a sweep
    /// finds it idle.
    fn release_connection(&self, key: ClientKey) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections_open.dec();
        let now = Instant::now();
        self.addresses.remove_if_mut(&key, |_, state| {
            state.connections = state.connections.saturating_sub(1);
            state.idle(now, &self.limits)
        });
    }

    /// A share is no longer held.
    fn release_share(&self, share: &mut Share) {
        let now = Instant::now();
        self.addresses.remove_if_mut(&share.key, |_, state| {
            state.bindings = state.bindings.saturating_sub(share.bindings);
            for exchange in share.exchanges.drain(..) {
                if let Some(n) = state.exchanges.get_mut(&exchange) {
                    *n -= 1;
                    if *n == 0 {
                        state.exchanges.remove(&exchange);
                    }
                }
            }
            state.idle(now, &self.limits)
        });
    }
}
