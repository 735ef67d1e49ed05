//! Request-smuggling defence: HTTP/1 framing headers that proxies and backends could read
//! differently are refused with a 400 before anything is forwarded.

use http::{HeaderMap, header};

/// Why a request's framing is refused (the 400 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Both `Transfer-Encoding` and `Content-Length`.
    #[error("both Transfer-Encoding and Content-Length are present")]
    LengthAndChunked,
    /// `Transfer-Encoding` other than exactly one `chunked`.
    #[error("only \"Transfer-Encoding: chunked\" is accepted")]
    TransferEncoding,
    /// Several different or non-numeric `Content-Length` values.
    #[error("Content-Length must be one decimal number")]
    ContentLength,
    /// More than one `Host` header.
    #[error("more than one Host header")]
    DuplicateHost,
}

/// Checks the framing headers of an HTTP/1 request; `raw_head` is the head as received
/// (the parser drops `Content-Length` when `Transfer-Encoding` is present, but both together
/// are refused here).
///
/// # Errors
/// The first [`FramingError`] found.
pub fn check(headers: &HeaderMap, raw_head: &[u8]) -> Result<(), FramingError> {
    if headers.contains_key(header::TRANSFER_ENCODING) && declares_length(raw_head) {
        return Err(FramingError::LengthAndChunked);
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err(FramingError::DuplicateHost);
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let first_length = lengths.next();
    if let Some(first) = first_length {
        let valid =
            |v: &http::HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !valid(first) || lengths.any(|other| other != first) {
            return Err(FramingError::ContentLength);
        }
    }
    let mut encodings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(encoding) = encodings.next() {
        if first_length.is_some() {
            return Err(FramingError::LengthAndChunked);
        }
        let chunked = encoding
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || encodings.next().is_some() {
            return Err(FramingError::TransferEncoding);
        }
    }
    Ok(())
}

/// True when a header line of `raw_head` is `Content-Length` (any case).
fn declares_length(raw_head: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length";
    raw_head
        .split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn plain_shapes_pass() {
        for ok in [
            vec![("host", "a")],
            vec![("host", "a"), ("content-length", "12")],
            vec![
                ("host", "a"),
                ("content-length", "12"),
                ("content-length", "12"),
            ],
            vec![("host", "a"), ("transfer-encoding", "Chunked")],
        ] {
            assert_eq!(
                check(&headers(&ok), b"GET / HTTP/1.1\r\n"),
                Ok(()),
                "{ok:?}"
            );
        }
    }

    #[test]
    fn smuggling_shapes_fail() {
        use FramingError::*;
        let cases: &[(&[(&str, &str)], FramingError)] = &[
            (
                &[("content-length", "5"), ("transfer-encoding", "chunked")],
                LengthAndChunked,
            ),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "5")],
                LengthAndChunked,
            ),
            (
                &[("content-length", "5"), ("content-length", "6")],
                ContentLength,
            ),
            (&[("content-length", "5, 5")], ContentLength),
            (&[("content-length", "+5")], ContentLength),
            (&[("transfer-encoding", "gzip, chunked")], TransferEncoding),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                TransferEncoding,
            ),
            (&[("transfer-encoding", "xchunked")], TransferEncoding),
            (&[("host", "a"), ("host", "b")], DuplicateHost),
        ];
        for (pairs, want) in cases {
            assert_eq!(check(&headers(pairs), b""), Err(*want), "{pairs:?}");
        }
        // What the parser leaves when both were sent: TE only, but the raw head tells.
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            check(&headers(&[("transfer-encoding", "chunked")]), raw),
            Err(LengthAndChunked)
        );
    }
}
