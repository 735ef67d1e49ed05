//! Durations written like `"15m"`, `"10s"`, `"1h30m"` or `"500ms"`.

use std::time::Duration;

/// Parses one or more `<integer><unit>` parts, units `h`, `m`, `s`, `ms`.
///
/// Returns `None` for anything else (empty, missing unit, unknown unit,
/// fractions, overflow).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "h" => Duration::from_secs(number.checked_mul(3600)?),
            "m" => Duration::from_secs(number.checked_mul(60)?),
            "s" => Duration::from_secs(number),
            "ms" => Duration::from_millis(number),
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(part)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_durations() {
        let cases = [
            ("15m", 900_000),
            ("10s", 10_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("0s", 0),
            ("1m30s", 90_000),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_millis(millis)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_invalid_durations() {
        for text in ["", "15", "m", "1.5s", "10 s", "10x", "-1s", "1d", "s10"] {
            assert_eq!(parse_duration(text), None, "{text}");
        }
    }
}
