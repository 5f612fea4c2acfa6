//! TTLs are counted in hours, fractional hours allowed, at most a year.

use crate::Millis;

/// Longest TTL: one year.
pub const MAX_TTL_HOURS: f64 = 8760.0;
/// Default TTL of a project when none is given.
pub const DEFAULT_TTL_HOURS: f64 = 72.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TtlError {
    #[error("ttl_hours must be a number greater than 0 and at most {MAX_TTL_HOURS}, got {0}")]
    OutOfRange(f64),
}

/// Checks a TTL given in hours.
pub fn validate_hours(hours: f64) -> Result<f64, TtlError> {
    if hours.is_finite() && hours > 0.0 && hours <= MAX_TTL_HOURS {
        Ok(hours)
    } else {
        Err(TtlError::OutOfRange(hours))
    }
}

/// Hours → milliseconds, rounded to the millisecond.
pub fn hours_to_ms(hours: f64) -> Millis {
    (hours * 3_600_000.0).round() as Millis
}

/// When something built at `built_at` with this TTL expires.
pub fn expires_at(built_at: Millis, hours: f64) -> Millis {
    built_at.saturating_add(hours_to_ms(hours))
}

/// Time left before `expires_at`, zero when past.
pub fn remaining(expires_at: Millis, now: Millis) -> Millis {
    expires_at.saturating_sub(now)
}

/// "3d 4h", "2h 05m", "12m", "40s": short wording for pages and listings.
pub fn format_remaining(ms: Millis) -> String {
    let s = ms / 1000;
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(validate_hours(0.001).is_ok());
        assert!(validate_hours(8760.0).is_ok());
        for bad in [0.0, -1.0, 8760.01, f64::NAN, f64::INFINITY] {
            assert!(validate_hours(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arithmetic() {
        assert_eq!(hours_to_ms(0.5), 1_800_000);
        assert_eq!(expires_at(1000, 0.001), 4600);
        assert_eq!(remaining(4600, 5000), 0);
        assert_eq!(format_remaining(hours_to_ms(26.0)), "1d 2h");
        assert_eq!(format_remaining(hours_to_ms(2.25)), "2h 15m");
        assert_eq!(format_remaining(45_000), "45s");
    }
}
