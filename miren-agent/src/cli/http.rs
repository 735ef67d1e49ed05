//! A minimal synchronous HTTP/1.1 client over a Unix socket: one request per connection
//! (`Connection: close`), bodies delimited by `Content-Length`, chunked encoding, or EOF.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::error::{CliError, HttpError};

/// Request methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lowercased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Percent-encodes `text` for use as one URL path segment or query value: everything but
/// RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A request body: its content type and bytes.
pub type RequestBody<'a> = (&'a str, &'a [u8]);

/// Sends one request to the HTTP server on `socket` and reads the whole response. A server
/// that answers before it has read the whole body (e.g. 413 for an upload over its limit)
/// and closes the connection is still heard: its response is read after the failed write.
///
/// # Errors
/// [`CliError::Connect`] when the socket cannot be connected, [`CliError::Io`] when the
/// exchange fails or times out, [`CliError::Http`] when the answer is not HTTP.
pub fn request(
    socket: &Path,
    timeout: Duration,
    method: Method,
    path: &str,
    body: Option<RequestBody<'_>>,
) -> Result<Response, CliError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| CliError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    let io_err = |source| CliError::Io {
        socket: socket.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let (head, bytes) = match body {
        Some((content_type, bytes)) => (
            encode_head(method, path, Some((content_type, bytes.len()))),
            bytes,
        ),
        None => (encode_head(method, path, None), &[][..]),
    };
    let sent = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(bytes));
    match (sent, read_response(&mut stream, socket)) {
        (Ok(()), response) | (Err(_), response @ Ok(_)) => response,
        (Err(source), Err(_)) => Err(io_err(source)),
    }
}

/// The head of a request: `Host`, `Connection: close`, `Content-Length` and, with a body
/// (content type, length), its `Content-Type`.
fn encode_head(method: Method, path: &str, body: Option<(&str, usize)>) -> String {
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: miren/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        method.as_str(),
        env!("CARGO_PKG_VERSION"),
    );
    let length = match body {
        Some((content_type, length)) => {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
            length
        }
        None => 0,
    };
    head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    head
}

/// Reads until a complete response has been parsed or the server closes the connection.
fn read_response(stream: &mut UnixStream, socket: &Path) -> Result<Response, CliError> {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 8192];
    loop {
        let n = stream.read(&mut chunk).map_err(|source| CliError::Io {
            socket: socket.to_owned(),
            source,
        })?;
        if n == 0 {
            return parse_response(&buf, true)?.ok_or(CliError::Http(HttpError::Truncated));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(response) = parse_response(&buf, false)? {
            return Ok(response);
        }
    }
}

/// Parses a response from the bytes received so far. `Ok(None)` means more bytes are
/// needed; with `eof` the stream has ended, so a body without length runs to the end.
///
/// # Errors
/// [`HttpError`] when the bytes cannot be the start of a valid response.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, HttpError> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if eof {
            Err(HttpError::Truncated)
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| HttpError::Header(String::from_utf8_lossy(&buf[..head_end]).into_owned()))?;
    let mut lines = head.split("\r\n");
    let status = parse_status_line(lines.next().unwrap_or_default())?;
    let headers = lines
        .map(|line| {
            line.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .ok_or_else(|| HttpError::Header(line.to_owned()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &buf[head_end + 4..];
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| HttpError::ContentLength(length.to_owned()))?;
        rest.get(..length).map(<[u8]>::to_vec)
    } else if eof || status == 204 || status == 304 {
        Some(rest.to_vec())
    } else {
        None
    };
    match body {
        Some(body) => {
            response.body = body;
            Ok(Some(response))
        }
        None if eof => Err(HttpError::Truncated),
        None => Ok(None),
    }
}

/// `HTTP/1.x CODE [REASON]` → CODE.
fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    let bad = || HttpError::StatusLine(line.to_owned());
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 {
        return Err(bad());
    }
    code.parse().map_err(|_| bad())
}

/// Decodes a chunked body; `Ok(None)` until the last chunk and the trailers are complete.
fn decode_chunked(mut rest: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&rest[..line_end])
            .map_err(|_| HttpError::Chunk("chunk size is not text"))?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpError::Chunk("chunk size is not a hex number"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailer fields until an empty line.
            loop {
                let Some(end) = find(rest, b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[end + 2..];
            }
        }
        let Some(data) = rest.get(..size) else {
            return Ok(None);
        };
        match rest.get(size..size + 2) {
            None => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err(HttpError::Chunk("chunk data not followed by CRLF")),
        }
        body.extend_from_slice(data);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &str) -> Response {
        parse_response(raw.as_bytes(), false)
            .expect("valid response")
            .expect("complete response")
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(encode_component("*.example.com"), "%2A.example.com");
        assert_eq!(encode_component("irc-server_1.~"), "irc-server_1.~");
        assert_eq!(encode_component("a b/c?d#e%f"), "a%20b%2Fc%3Fd%23e%25f");
        assert_eq!(encode_component("bücher.de"), "b%C3%BCcher.de");
        assert_eq!(encode_component(""), "");
    }

    #[test]
    fn request_heads() {
        let text = encode_head(Method::Post, "/v1/apps", Some(("application/json", 2)));
        assert!(text.starts_with("POST /v1/apps HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"));
        let text = encode_head(Method::Get, "/v1/status", None);
        assert!(!text.contains("Content-Type"));
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn content_length_body() {
        let raw =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n[1,2,3]";
        let response = complete(raw);
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.body, b"[1,2,3]");
        // Incomplete until all announced bytes are there; truncated at EOF.
        assert_eq!(
            parse_response(&raw.as_bytes()[..raw.len() - 1], false),
            Ok(None)
        );
        assert_eq!(
            parse_response(&raw.as_bytes()[..raw.len() - 1], true),
            Err(HttpError::Truncated)
        );
    }

    #[test]
    fn chunked_body() {
        let raw = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;ext=1\r\n[1,2\r\nA\r\n,3,4,5,6,7\r\n1\r\n]\r\n0\r\nX-Trailer: y\r\n\r\n";
        assert_eq!(complete(raw).body, b"[1,2,3,4,5,6,7]");
        for cut in [raw.len() - 2, raw.len() - 20, raw.len() - 30, 60] {
            assert_eq!(
                parse_response(&raw.as_bytes()[..cut], false),
                Ok(None),
                "{cut}"
            );
        }
        let bad = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(
            parse_response(bad.as_bytes(), false),
            Err(HttpError::Chunk("chunk size is not a hex number"))
        );
        let bad = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n";
        assert_eq!(
            parse_response(bad.as_bytes(), false),
            Err(HttpError::Chunk("chunk data not followed by CRLF"))
        );
    }

    #[test]
    fn body_until_eof_without_length() {
        let raw = b"HTTP/1.0 404 Not Found\r\n\r\nnot here";
        assert_eq!(parse_response(raw, false), Ok(None));
        let response = parse_response(raw, true).expect("valid").expect("complete");
        assert_eq!(
            (response.status, response.body.as_slice()),
            (404, &b"not here"[..])
        );
    }

    #[test]
    fn error_body_response() {
        let body = r#"{"error":"app \"x\" does not exist","kind":"not_found"}"#;
        let raw = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let response = complete(&raw);
        assert_eq!(response.status, 404);
        assert_eq!(response.body, body.as_bytes());
    }

    #[test]
    fn malformed_heads() {
        let cases: [(&[u8], HttpError); 5] = [
            (
                b"SSH-2.0-OpenSSH\r\n\r\n",
                HttpError::StatusLine("SSH-2.0-OpenSSH".to_owned()),
            ),
            (
                b"HTTP/1.1 20 OK\r\n\r\n",
                HttpError::StatusLine("HTTP/1.1 20 OK".to_owned()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n",
                HttpError::Header("broken".to_owned()),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                HttpError::ContentLength("-1".to_owned()),
            ),
            (b"HTTP/1.1 200 OK\r\n", HttpError::Truncated),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_response(raw, true), Err(want));
        }
    }
}
