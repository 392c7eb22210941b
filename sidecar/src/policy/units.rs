//! Human sizes (`64KiB`, `1MiB`, `512`) and percentages (`20%`) in policy files.

/// Parses a size in bytes: a plain number, or a number with `B`, `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`,
/// which mean the same powers of two, as nginx reads `k` and `m`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits == 0 {
        return Err(format!(
            "expected a size such as 64KiB or 1MiB, got {text:?}"
        ));
    }
    let value: u64 = text[..digits]
        .parse()
        .map_err(|_| format!("number too large in {text:?}"))?;
    let unit = text[digits..].trim();
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "kb" | "k" => 1 << 10,
        "mib" | "mb" | "m" => 1 << 20,
        "gib" | "gb" | "g" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("size too large: {text:?}"))
}

/// Formats a size the way policy files write it.
pub fn format_size(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

/// A percentage between 0 and 100, written `20%` (or a bare number).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(f64);

impl Percent {
    pub fn parse(text: &str) -> Result<Self, String> {
        let number = text.trim().trim_end_matches('%').trim();
        let value: f64 = number
            .parse()
            .map_err(|_| format!("expected a percentage such as 20%, got {text:?}"))?;
        if !(0.0..=100.0).contains(&value) {
            return Err(format!("must be between 0% and 100%, got {text:?}"));
        }
        Ok(Self(value))
    }

    /// The share as a fraction in [0, 1].
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

/// Serde adapters for optional sizes.
pub mod serde_size {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Number(n)) => Ok(Some(n)),
            Some(Raw::Text(t)) => super::parse_size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_operators_write_them() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn percentages_are_bounded() {
        assert_eq!(Percent::parse("20%").map(Percent::fraction), Ok(0.2));
        assert_eq!(Percent::parse("50").map(Percent::fraction), Ok(0.5));
        assert!(Percent::parse("120%").is_err());
        assert!(Percent::parse("-1%").is_err());
        assert!(Percent::parse("half").is_err());
    }
}
