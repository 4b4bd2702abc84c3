//! When remote layers become plain directories without being asked (the `[unlazy]`
//! section of the configuration). An explicit request (`lazysnap unlazy`, or the
//! [`UNLAZY`](super::labels::UNLAZY) label set with Update) always works.

use super::remote::Progress;
use serde::{Deserialize, Serialize};

/// The unlazy policies; all off by default, so that layers stay lazy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnlazyPolicy {
    /// Unlazy the remote layers under an active snapshot when it is prepared (a
    /// container's or a build step's writable layer), before Prepare answers.
    pub on_prepare: bool,
    /// Materialize a layer once background fetch has made all of it local.
    pub when_complete: bool,
    /// Adaptive: when readers have read this fraction of a layer's bytes, fetch the
    /// rest in parallel ranges and materialize it, so that a workload reading most of
    /// its image is no slower than a full pull. 0 turns it off.
    pub read_fraction: f64,
    /// How often the policies look at the mounted layers, in milliseconds.
    pub interval_ms: u64,
}

impl Default for UnlazyPolicy {
    fn default() -> Self {
        UnlazyPolicy {
            on_prepare: false,
            when_complete: false,
            read_fraction: 0.0,
            interval_ms: 1000,
        }
    }
}

impl UnlazyPolicy {
    /// Whether a background watcher is needed.
    pub fn watches(&self) -> bool {
        self.when_complete || self.read_fraction > 0.0
    }

    /// Rejects values that cannot mean anything.
    pub fn validate(&self) -> crate::error::Result<()> {
        if !(0.0..=1.0).contains(&self.read_fraction) || self.read_fraction.is_nan() {
            return Err(crate::error::Error::InvalidArgument(format!(
                "unlazy.read_fraction must be between 0 and 1, not {}",
                self.read_fraction
            )));
        }
        if self.interval_ms == 0 {
            return Err(crate::error::Error::InvalidArgument(
                "unlazy.interval_ms must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Why a layer with this progress should be unlazied now, if it should.
    pub fn reason(&self, p: &Progress) -> Option<&'static str> {
        if self.when_complete && p.complete() {
            return Some("background fetch completed the layer");
        }
        if self.read_fraction > 0.0
            && p.bytes_total > 0
            && p.bytes_served as f64 >= self.read_fraction * p.bytes_total as f64
        {
            return Some("readers read past the adaptive fraction");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(total: u64, cached: u64, served: u64) -> Progress {
        Progress {
            bytes_total: total,
            bytes_cached: cached,
            bytes_served: served,
        }
    }

    #[test]
    fn off_by_default() {
        let pol = UnlazyPolicy::default();
        assert!(!pol.watches());
        assert_eq!(pol.reason(&p(10, 10, 10)), None);
    }

    #[test]
    fn complete_and_adaptive_reasons() {
        let pol = UnlazyPolicy {
            when_complete: true,
            ..Default::default()
        };
        assert!(pol.reason(&p(10, 10, 0)).is_some());
        assert!(pol.reason(&p(10, 9, 0)).is_none());
        let pol = UnlazyPolicy {
            read_fraction: 0.5,
            ..Default::default()
        };
        assert!(pol.reason(&p(100, 0, 49)).is_none());
        assert!(pol.reason(&p(100, 0, 50)).is_some());
        assert!(pol.reason(&p(0, 0, 0)).is_none());
    }

    #[test]
    fn rejects_nonsense() {
        for f in [-0.1, 1.5, f64::NAN] {
            let pol = UnlazyPolicy {
                read_fraction: f,
                ..Default::default()
            };
            assert!(pol.validate().is_err(), "{f}");
        }
        let pol = UnlazyPolicy {
            interval_ms: 0,
            ..Default::default()
        };
        assert!(pol.validate().is_err());
    }
}
