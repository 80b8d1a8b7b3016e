//! Resumable ids: what an id names (an epoch, a subscription, a position in its log), how
//! it is written and read, and why a position cannot be resumed.
//!
//! Invariant: an id is opaque to clients and names one subscription's history only; the
//! epoch is random per process and the subscription part random per subscription, so an
//! id cannot be guessed from the bindings, and an id that does not parse is refused
//! (a `gap`), never interpreted.

/// What a resumable id names: an epoch, a subscription, a position in its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub key: u64,
    pub seq: u64,
}

impl Position {
    /// The id text: `<epoch>-<subscription>-<seq>` (hex, hex, decimal).
    pub fn id(&self) -> String {
        format!("{:016x}-{:016x}-{}", self.epoch, self.key, self.seq)
    }

    /// Parses an id; `None` if it is not one this gateway writes.
    pub fn parse(id: &str) -> Option<Self> {
        let mut parts = id.trim().splitn(3, '-');
        let epoch = parts.next().filter(|p| p.len() == 16)?;
        let key = parts.next().filter(|p| p.len() == 16)?;
        let seq = parts.next()?;
        if !seq.bytes().all(|b| b.is_ascii_digit()) || seq.len() > 20 {
            return None;
        }
        Some(Self {
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            key: u64::from_str_radix(key, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// Why a resumable client cannot be replayed from its id (it starts live, after a `gap`
/// event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gap {
    /// Not an id this gateway writes.
    Invalid,
    /// Written by another process (a restart, another replica).
    OtherEpoch,
    /// Another subscription's, or one that is gone.
    OtherSubscription,
    /// Older than what the replay window keeps.
    Expired,
}

impl Gap {
    /// The `reason` of the `gap` event.
    pub fn reason(&self) -> &'static str {
        match self {
            Gap::Invalid => "invalid-id",
            Gap::OtherEpoch => "other-epoch",
            Gap::OtherSubscription => "other-subscription",
            Gap::Expired => "expired",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_an_epoch_a_subscription_and_a_position() {
        let at = Position {
            epoch: 0xfeed,
            key: u64::MAX,
            seq: 42,
        };
        assert_eq!(at.id(), "000000000000feed-ffffffffffffffff-42");
        assert_eq!(Position::parse(&at.id()), Some(at));
        for bad in [
            "-",
            "",
            "42",
            "000000000000feed-ffffffffffffffff-",
            "000000000000feed-ffffffffffffffff-4x",
            "feed-ffffffffffffffff-42",
            "000000000000feed-ffffffffffffffff-99999999999999999999999",
            "000000000000fezd-ffffffffffffffff-1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }
}
