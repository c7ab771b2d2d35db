//! Durations in the Gateway API's format (`1h`, `30s`, `500ms`, `1m30s`).

use std::{fmt, str::FromStr, time};

/// A non-negative duration written the Gateway API way (GEP-2257): one to four
/// `<number><unit>` parts, units `h`, `m`, `s`, `ms`, each number at most 5 digits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(time::Duration);

/// A duration string that is not in the Gateway API format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {value:?}: {reason} (write it like 500ms, 10s, 1m30s or 1h)")]
pub struct ParseDurationError {
    value: String,
    reason: &'static str,
}

impl Duration {
    /// Wraps a std duration.
    pub const fn from_std(d: time::Duration) -> Self {
        Self(d)
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(time::Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(time::Duration::from_secs(s))
    }

    /// The std duration.
    pub const fn as_std(self) -> time::Duration {
        self.0
    }

    /// Whether this is zero, which the Gateway API reads as "no timeout".
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            value: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s == "0" {
            return Ok(Self::default());
        }
        let mut total = time::Duration::ZERO;
        let mut rest = s;
        let mut parts = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("expected a number"));
            }
            if digits > 5 {
                return Err(err("a number has more than 5 digits"));
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err("bad number"))?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (time::Duration::from_millis(1), 2)
            } else if rest.starts_with('h') {
                (time::Duration::from_secs(3600), 1)
            } else if rest.starts_with('m') {
                (time::Duration::from_secs(60), 1)
            } else if rest.starts_with('s') {
                (time::Duration::from_secs(1), 1)
            } else {
                return Err(err("unit must be h, m, s or ms"));
            };
            rest = &rest[len..];
            total += unit * n as u32;
            parts += 1;
            if parts > 4 {
                return Err(err("more than 4 parts"));
            }
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_forms() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!("500ms".parse(), Ok(ms(500)));
        assert_eq!("10s".parse(), Ok(ms(10_000)));
        assert_eq!("1m30s".parse(), Ok(ms(90_000)));
        assert_eq!("1h".parse(), Ok(ms(3_600_000)));
        assert_eq!("1h2m3s4ms".parse(), Ok(ms(3_723_004)));
        assert_eq!("0s".parse(), Ok(ms(0)));
        assert_eq!("0".parse(), Ok(ms(0)));
    }

    #[test]
    fn refuses_other_forms() {
        for bad in [
            "",
            "10",
            "1.5s",
            "-1s",
            "10x",
            "s",
            "123456s",
            "1h1h1h1h1h",
            "10 s",
        ] {
            let e = bad.parse::<Duration>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn displays_round_trip() {
        for s in ["500ms", "10s", "1m30s", "1h", "1h2m3s4ms"] {
            assert_eq!(s.parse::<Duration>().unwrap().to_string(), s);
        }
    }
}
