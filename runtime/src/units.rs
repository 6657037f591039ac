//! Byte sizes and durations as people write them (`16MiB`, `500ms`, `1m 30s`): parsed from
//! flags, configuration files and plugin declarations, and formatted back in messages.
//!
//! One place for both directions, so a limit reads the same in `wasmq.toml`, in a
//! `#[task(memory = "64MiB")]` declaration and in the error that reports it exceeded.

use std::time::Duration;

/// Limits as written in a configuration file or on the command line (`[limits]`,
/// `[ceiling]`, a tenant's), each value optional.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Fuel units.
    pub fuel: Option<u64>,
    /// A size, e.g. `128MiB`.
    pub memory: Option<String>,
    /// A duration, e.g. `30s`.
    pub timeout: Option<String>,
}

/// Text that is not a size or a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a {what} (try {examples})")]
pub struct UnitError {
    /// The text as given.
    pub text: String,
    /// What was expected: `size` or `duration`.
    pub what: &'static str,
    /// Examples of what would have been understood.
    pub examples: &'static str,
}

/// Formats a byte count the way users write it: `128 MiB`, `1.5 KiB`, `100 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// Formats a duration compactly: `2s`, `500ms`, `1m 30s`.
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Parses a size like `16MiB`, `512KiB`, `1GB` or a plain number of bytes.
///
/// # Errors
/// [`UnitError`] naming the text when it is not a size.
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| UnitError {
            text: text.to_owned(),
            what: "size",
            examples: "16MiB, 512KiB or 1GiB",
        })
}

/// Parses a duration like `2s`, `500ms` or `1m`.
///
/// # Errors
/// [`UnitError`] naming the text when it is not a duration.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(text.trim()).map_err(|_| UnitError {
        text: text.to_owned(),
        what: "duration",
        examples: "2s, 500ms or 1m",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_round_trip_as_written() {
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(
            parse_bytes("lots")
                .unwrap_err()
                .to_string()
                .contains("`lots`")
        );
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(
            parse_duration("soon").unwrap_err().to_string(),
            "`soon` is not a duration (try 2s, 500ms or 1m)"
        );
        assert_eq!(format_bytes(128 << 20), "128 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s 500ms");
    }
}
