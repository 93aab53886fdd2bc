//! The metrics listener's HTTP/1.x: parse one request from the bytes received so far and,
//! once it is complete, say what it asks for or build the whole response.
//!
//! Owns no socket and keeps no state: the engine feeds it everything a connection has sent and
//! writes back what it returns, then closes (`Connection: close`; one request per connection).
//! Request bytes are untrusted: anything malformed, or a head longer than
//! [`REQUEST_HEAD_BYTES_MAX`], gets a 400, never a panic. Only the head is read; a body is
//! ignored (the engine should shut down its write side before closing, so that unread body
//! bytes do not make the kernel reset the connection under the response).
//!
//! | request                         | response                                  |
//! |---------------------------------|-------------------------------------------|
//! | incomplete head, <= 8 KiB       | `Incomplete`: read more                   |
//! | head > 8 KiB, or malformed      | 400                                       |
//! | path other than the three below | 404                                       |
//! | a known path, not GET or HEAD   | 405 with `Allow: GET, HEAD`               |
//! | `GET /healthz`                  | 200 `ok`, at once (the engine is not asked) |
//! | `GET /readyz`                   | `Ready`: 200 `ready`, or 503 with a line per reason |
//! | `GET /metrics`                  | `Metrics`: 200, the exposition in the format `Accept` prefers |
//! | `HEAD` of any of them           | the same headers, no body                 |
//!
//! `Accept` (RFC 9110 12.5.1, q-values honoured): OpenMetrics 1.0.0 when
//! `application/openmetrics-text` is ranked at least as high as `text/plain` (or `text/*`,
//! `*/*`); the classic text 0.0.4 otherwise, and when there is no `Accept`.

use super::{encode, ExpositionFormat, MetricsSnapshot};

/// Longest request head (request line, headers and the blank line) accepted, in bytes.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// The paths served.
const METRICS_PATH: &[u8] = b"/metrics";
const HEALTH_PATH: &[u8] = b"/healthz";
const READY_PATH: &[u8] = b"/readyz";

/// What a request asks for, once [`parse_request`] has seen it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpRequest {
    /// The head is not complete: read more.
    Incomplete,
    /// A valid `GET`/`HEAD /metrics`: answer with [`metrics_response`] once the snapshot is
    /// built, in the format the `Accept` header chose.
    Metrics {
        with_body: bool,
        format: ExpositionFormat,
    },
    /// A valid `GET`/`HEAD /readyz`: answer with [`readiness_response`] once the cores have
    /// reported.
    Ready { with_body: bool },
}

/// Parse one HTTP/1.x request from `request` (all bytes received on the connection so far):
/// `Ok(what it asks for)` when it needs the engine, `Err(response)` when it is answered by
/// what it is alone (malformed, wrong path or method, `/healthz`).
pub fn parse_request(request: &[u8]) -> Result<HttpRequest, Vec<u8>> {
    let head = match head_end(request) {
        Some(end) if end <= REQUEST_HEAD_BYTES_MAX => &request[..end],
        Some(_) => return Err(bad_request()),
        None if request.len() >= REQUEST_HEAD_BYTES_MAX => return Err(bad_request()),
        None => {
            // Answer garbage (say, the bridge's binary protocol sent to this port) as soon as
            // its first line shows it, rather than waiting for 8 KiB that may never come.
            return match request.iter().position(|b| *b == b'\n') {
                Some(end) if request_line(trim_cr(&request[..end])).is_none() => Err(bad_request()),
                None if request.iter().any(|b| !is_request_line_byte(*b)) => Err(bad_request()),
                _ => Ok(HttpRequest::Incomplete),
            };
        }
    };
    let Some(parsed) = parse_head(head) else {
        return Err(bad_request());
    };
    let known = [METRICS_PATH, HEALTH_PATH, READY_PATH];
    if !known.contains(&parsed.path) {
        return Err(response(
            "404 Not Found",
            TEXT,
            &[],
            b"not found: the metrics are at /metrics (and /healthz, /readyz)\n",
            true,
        ));
    }
    let with_body = match parsed.method {
        b"GET" => true,
        b"HEAD" => false,
        _ => {
            return Err(response(
                "405 Method Not Allowed",
                TEXT,
                &["Allow: GET, HEAD"],
                b"method not allowed: use GET\n",
                true,
            ))
        }
    };
    match parsed.path {
        // Alive: this thread parsed the request, which is all liveness claims.
        HEALTH_PATH => Err(response("200 OK", TEXT, &[], b"ok\n", with_body)),
        READY_PATH => Ok(HttpRequest::Ready { with_body }),
        _ => Ok(HttpRequest::Metrics {
            with_body,
            format: parsed.format,
        }),
    }
}

/// Parse one HTTP/1.x request from `request` (all bytes received on the connection so far).
/// `None`: the head is incomplete, read more. `Some(bytes)`: the complete response to write
/// before closing. `snapshot` is called only for a valid `GET` or `HEAD` of `/metrics`;
/// `/readyz` is answered as if every condition held (the engine uses [`parse_request`]).
pub fn http_response(
    request: &[u8],
    snapshot: impl FnOnce() -> MetricsSnapshot,
) -> Option<Vec<u8>> {
    match parse_request(request) {
        Ok(HttpRequest::Incomplete) => None,
        Ok(HttpRequest::Metrics { with_body, format }) => {
            Some(metrics_response(&snapshot(), format, with_body))
        }
        Ok(HttpRequest::Ready { with_body }) => Some(readiness_response(&[], with_body)),
        Err(response) => Some(response),
    }
}

/// The 200 answer to `/metrics`: the snapshot in `format`, under its content type.
pub fn metrics_response(
    snapshot: &MetricsSnapshot,
    format: ExpositionFormat,
    with_body: bool,
) -> Vec<u8> {
    let text = encode(snapshot, format);
    response(
        "200 OK",
        format.content_type(),
        &[],
        text.as_bytes(),
        with_body,
    )
}

/// The answer to `/readyz`: 200 `ready` when `not_ready` is empty, else 503 with one line per
/// condition that does not hold.
pub fn readiness_response(not_ready: &[String], with_body: bool) -> Vec<u8> {
    if not_ready.is_empty() {
        return response("200 OK", TEXT, &[], b"ready\n", with_body);
    }
    let mut body = String::new();
    for reason in not_ready {
        body.push_str(reason);
        body.push('\n');
    }
    response(
        "503 Service Unavailable",
        TEXT,
        &[],
        body.as_bytes(),
        with_body,
    )
}

/// A 503 with `reason` as its body: the bridge could not build the snapshot (for a request
/// `http_response` found complete and valid).
pub fn unavailable_response(reason: &str) -> Vec<u8> {
    let body = format!("metrics unavailable: {reason}\n");
    response("503 Service Unavailable", TEXT, &[], body.as_bytes(), true)
}

/// The content type of every plain-text answer that is not the exposition.
const TEXT: &str = "text/plain; charset=utf-8";

/// The length of the head including its terminating blank line (CRLF CRLF, or bare LFs, which
/// RFC 9112 lets a server accept), if it is all there.
fn head_end(request: &[u8]) -> Option<usize> {
    // Only the first bytes can hold an acceptable head; do not scan megabytes of garbage.
    let window = &request[..request.len().min(REQUEST_HEAD_BYTES_MAX + 4)];
    let mut line_start = 0;
    for (i, byte) in window.iter().enumerate() {
        if *byte == b'\n' {
            let line = &window[line_start..i];
            if (line.is_empty() || line == b"\r") && line_start > 0 {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

struct Head<'a> {
    method: &'a [u8],
    /// The path, without query string.
    path: &'a [u8],
    /// The exposition format its `Accept` headers prefer.
    format: ExpositionFormat,
}

/// Parse a complete head (request line, header lines, blank line); `None` if malformed.
fn parse_head(head: &[u8]) -> Option<Head<'_>> {
    let mut lines = head.split(|b| *b == b'\n').map(trim_cr);
    let (method, target, http11) = request_line(lines.next()?)?;
    let mut hosts = 0;
    let mut accept = Accept::default();
    for line in lines {
        if line.is_empty() {
            break; // The blank line ending the head (parse_head gets nothing after it).
        }
        let (name, value) = header(line)?;
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            // RFC 9112 3.2: an authority of visible characters, may be empty.
            if value.iter().any(|b| !(0x21..=0x7e).contains(b)) {
                return None;
            }
        }
        if name.eq_ignore_ascii_case(b"accept") {
            accept.add(value);
        }
    }
    // RFC 9112 3.2: an HTTP/1.1 request without exactly one Host gets a 400.
    if hosts > 1 || (http11 && hosts == 0) {
        return None;
    }
    let path = path_of(target)?;
    Some(Head {
        method,
        path,
        format: accept.format(),
    })
}

/// The best quality (`q`, in thousandths) an `Accept` header list gives each format.
#[derive(Default)]
struct Accept {
    openmetrics: u16,
    text: u16,
    /// Whether any `Accept` header came (none: the classic text, as for `*/*`).
    seen: bool,
}

impl Accept {
    /// Take one `Accept` header's media ranges (RFC 9110 12.5.1), ignoring what is malformed.
    fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for range in value.split(|b| *b == b',') {
            let mut parts = range.split(|b| *b == b';').map(<[u8]>::trim_ascii);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1000;
            for parameter in parts {
                let Some(eq) = parameter.iter().position(|b| *b == b'=') else {
                    continue;
                };
                let (name, value) = (parameter[..eq].trim_ascii(), &parameter[eq + 1..]);
                if name.eq_ignore_ascii_case(b"q") {
                    q = quality(value.trim_ascii()).unwrap_or(0);
                }
            }
            let slot = match media.as_slice() {
                b"application/openmetrics-text" => &mut self.openmetrics,
                b"text/plain" | b"text/*" | b"*/*" => &mut self.text,
                _ => continue,
            };
            *slot = (*slot).max(q);
        }
    }

    /// OpenMetrics when it is asked for at least as much as the classic text; else the text.
    fn format(&self) -> ExpositionFormat {
        if self.seen && self.openmetrics > 0 && self.openmetrics >= self.text {
            ExpositionFormat::OpenMetrics
        } else {
            ExpositionFormat::Prometheus
        }
    }
}

/// An RFC 9110 qvalue (`0`, `0.5`, `1.000`) in thousandths.
fn quality(value: &[u8]) -> Option<u16> {
    let (whole, fraction) = match value.iter().position(|b| *b == b'.') {
        Some(dot) => (&value[..dot], &value[dot + 1..]),
        None => (value, &b""[..]),
    };
    if fraction.len() > 3 || !fraction.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for i in 0..3 {
        thousandths = thousandths * 10 + fraction.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match whole {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// `METHOD SP request-target SP HTTP/1.x`: the method, the target and whether it is 1.1.
fn request_line(line: &[u8]) -> Option<(&[u8], &[u8], bool)> {
    let mut parts = line.split(|b| *b == b' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some() || method.is_empty() || !method.iter().all(|b| is_token_byte(*b)) {
        return None;
    }
    if target.is_empty() || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return None;
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return None,
    };
    Some((method, target, http11))
}

/// `name: value` with a token name and no whitespace before the colon; the trimmed value.
fn header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|b| *b == b':')?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // A leading space or tab would be an obsolete line folding, which we refuse.
    if name.is_empty() || !name.iter().all(|b| is_token_byte(*b)) {
        return None;
    }
    if value
        .iter()
        .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    {
        return None;
    }
    let value = value.trim_ascii();
    Some((name, value))
}

/// The path of an origin-form (`/metrics?x`) or absolute-form (`http://host/metrics`) target.
fn path_of(target: &[u8]) -> Option<&[u8]> {
    let target = &target[..target
        .iter()
        .position(|b| *b == b'#')
        .unwrap_or(target.len())];
    let without_query = &target[..target
        .iter()
        .position(|b| *b == b'?')
        .unwrap_or(target.len())];
    if without_query.starts_with(b"/") || without_query == b"*" {
        return Some(without_query);
    }
    let lower = without_query.to_ascii_lowercase();
    let rest = if lower.starts_with(b"http://") {
        &without_query[7..]
    } else if lower.starts_with(b"https://") {
        &without_query[8..]
    } else {
        return None;
    };
    Some(match rest.iter().position(|b| *b == b'/') {
        Some(slash) => &rest[slash..],
        None => b"/",
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// RFC 9110 tchar.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte that may appear in a request line still being received.
fn is_request_line_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b) || b == b'\r'
}

fn bad_request() -> Vec<u8> {
    response(
        "400 Bad Request",
        "text/plain; charset=utf-8",
        &[],
        b"bad request\n",
        true,
    )
}

/// A whole HTTP/1.1 response; `Content-Length` is the body's even when it is left out (HEAD).
fn response(
    status: &str,
    content_type: &str,
    extra_headers: &[&str],
    body: &[u8],
    with_body: bool,
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for header in extra_headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = Vec::with_capacity(head.len() + if with_body { body.len() } else { 0 });
    out.extend_from_slice(head.as_bytes());
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::encode_prometheus;

    fn respond(request: &[u8]) -> Option<String> {
        http_response(request, MetricsSnapshot::default)
            .map(|bytes| String::from_utf8(bytes).unwrap())
    }

    fn status(request: &[u8]) -> String {
        let text = respond(request).expect("a complete response");
        text.lines().next().unwrap().to_string()
    }

    #[test]
    fn get_metrics_answers_the_exposition() {
        // Proves: a complete GET /metrics gets 200, the 0.0.4 content type, a matching
        // Content-Length, Connection: close and the exposition as body.
        let text = respond(b"GET /metrics HTTP/1.1\r\nHost: localhost:9100\r\nAccept: */*\r\n\r\n")
            .unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(body.contains("# TYPE acgi_bridge_connections gauge\n"));
        assert_eq!(body, encode_prometheus(&MetricsSnapshot::default()));
    }

    #[test]
    fn variants_of_a_valid_request_are_accepted() {
        // Proves: HTTP/1.0 without Host, bare LF line ends, a query string, an absolute-form
        // target and HEAD (no body) are all served.
        assert_eq!(status(b"GET /metrics HTTP/1.0\r\n\r\n"), "HTTP/1.1 200 OK");
        assert_eq!(
            status(b"GET /metrics HTTP/1.1\nHost: x\n\n"),
            "HTTP/1.1 200 OK"
        );
        assert_eq!(
            status(b"GET /metrics?name[]=x HTTP/1.1\r\nHost: x\r\n\r\n"),
            "HTTP/1.1 200 OK"
        );
        assert_eq!(
            status(b"GET http://x:9100/metrics HTTP/1.1\r\nHost: x:9100\r\n\r\n"),
            "HTTP/1.1 200 OK"
        );
        let head = respond(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
        let length = encode_prometheus(&MetricsSnapshot::default()).len();
        assert!(head.contains(&format!("Content-Length: {length}\r\n")));
    }

    #[test]
    fn partial_requests_ask_for_more() {
        // Proves: every strict prefix of a valid request is `None`, and the snapshot is not
        // taken until the request is complete.
        let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for end in 0..request.len() {
            let taken = std::cell::Cell::new(false);
            let answer = http_response(&request[..end], || {
                taken.set(true);
                MetricsSnapshot::default()
            });
            assert!(answer.is_none(), "prefix of {end} bytes answered");
            assert!(!taken.get());
        }
        assert!(respond(request).is_some());
    }

    #[test]
    fn wrong_path_is_404_and_wrong_method_405() {
        // Proves: other paths get 404 (whatever the method), other methods on /metrics 405
        // with Allow, and the snapshot is not taken for either.
        let never = || -> MetricsSnapshot { panic!("snapshot taken for an error") };
        for request in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /metrics/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /other HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let answer = String::from_utf8(http_response(request, never).unwrap()).unwrap();
            assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "get"] {
            let request =
                format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
            let answer =
                String::from_utf8(http_response(request.as_bytes(), never).unwrap()).unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
                "{answer}"
            );
            assert!(answer.contains("\r\nAllow: GET, HEAD\r\n"));
            assert!(answer.contains("\r\nConnection: close\r\n"));
        }
    }

    #[test]
    fn healthz_is_answered_alone_and_readyz_asks_for_the_cores() {
        // Proves: /healthz is 200 "ok" (HEAD: no body) without the engine; /readyz needs the
        // engine, and its answer is 200 "ready" or a 503 with one line per reason.
        let health = parse_request(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
        let health = String::from_utf8(health).unwrap();
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
        let head = parse_request(b"HEAD /healthz HTTP/1.0\r\n\r\n").unwrap_err();
        assert!(String::from_utf8(head)
            .unwrap()
            .ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"));
        assert_eq!(
            parse_request(b"GET /readyz?verbose HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(HttpRequest::Ready { with_body: true })
        );
        let post = parse_request(b"POST /readyz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
        assert!(String::from_utf8(post)
            .unwrap()
            .starts_with("HTTP/1.1 405 "));
        let ready = String::from_utf8(readiness_response(&[], true)).unwrap();
        assert!(ready.starts_with("HTTP/1.1 200 OK\r\n") && ready.ends_with("\r\n\r\nready\n"));
        let reasons = [
            "shutting down".to_string(),
            "service kv: failing".to_string(),
        ];
        let not_ready = String::from_utf8(readiness_response(&reasons, true)).unwrap();
        assert!(
            not_ready.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{not_ready}"
        );
        assert!(not_ready.ends_with("\r\n\r\nshutting down\nservice kv: failing\n"));
    }

    #[test]
    fn accept_chooses_openmetrics_only_when_preferred() {
        // Proves: the Accept header picks OpenMetrics when it ranks it at least as high as the
        // classic text (Prometheus' own header included), and the classic text otherwise.
        let format = |accept: Option<&str>| {
            let request = match accept {
                Some(accept) => {
                    format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n")
                }
                None => "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            };
            match parse_request(request.as_bytes()) {
                Ok(HttpRequest::Metrics {
                    format,
                    with_body: true,
                }) => format,
                other => panic!("{other:?}"),
            }
        };
        use ExpositionFormat::{OpenMetrics, Prometheus};
        let prometheus_server = "application/openmetrics-text;version=1.0.0,application/\
            openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(format(Some(prometheus_server)), OpenMetrics);
        assert_eq!(format(Some("application/openmetrics-text")), OpenMetrics);
        assert_eq!(
            format(Some(
                "Application/OpenMetrics-Text; version=1.0.0; charset=utf-8"
            )),
            OpenMetrics
        );
        assert_eq!(format(None), Prometheus);
        assert_eq!(format(Some("*/*")), Prometheus);
        assert_eq!(format(Some("text/plain")), Prometheus);
        assert_eq!(
            format(Some("text/plain;q=1, application/openmetrics-text;q=0.9")),
            Prometheus
        );
        assert_eq!(format(Some("application/openmetrics-text;q=0")), Prometheus);
        assert_eq!(
            format(Some("application/openmetrics-text;q=bogus")),
            Prometheus
        );
        assert_eq!(format(Some("application/json")), Prometheus);
        let answer = http_response(
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {prometheus_server}\r\n\r\n")
                .as_bytes(),
            MetricsSnapshot::default,
        )
        .unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.contains(
            "\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ));
        assert!(answer.ends_with("# EOF\n"));
    }

    #[test]
    fn malformed_requests_are_400() {
        // Proves: malformed request lines and headers get 400, as soon as they are visible.
        for request in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad name: v\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
            b"GET /m\xc3\xa9trics HTTP/1.1\r\nHost: x\r\n\r\n",
            // Incomplete, but the first line already shows garbage: no need to wait.
            b"\x00\x01\x02\x03binary frame",
            b"GET /metrics HTTP/1.1 \r\nHost: x",
        ] {
            assert_eq!(
                status(request),
                "HTTP/1.1 400 Bad Request",
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn oversized_heads_are_400() {
        // Proves: a head over 8 KiB gets 400, complete or not; one of exactly 8 KiB is served.
        let start = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        let end = b"\r\n\r\n";
        let exact = [
            &start[..],
            &vec![b'a'; REQUEST_HEAD_BYTES_MAX - start.len() - end.len()],
            end,
        ]
        .concat();
        assert_eq!(exact.len(), REQUEST_HEAD_BYTES_MAX);
        assert_eq!(status(&exact), "HTTP/1.1 200 OK");
        let over = [&start[..], &vec![b'a'; REQUEST_HEAD_BYTES_MAX], end].concat();
        assert_eq!(status(&over), "HTTP/1.1 400 Bad Request");
        // Never-ending headers: answered once 8 KiB arrived, not waited on forever.
        let endless = [&start[..], &vec![b'a'; REQUEST_HEAD_BYTES_MAX]].concat();
        assert!(respond(&endless[..REQUEST_HEAD_BYTES_MAX - 1]).is_none());
        assert_eq!(status(&endless), "HTTP/1.1 400 Bad Request");
        // A huge buffer is not scanned past the limit (and is still a 400).
        let huge = vec![b'a'; 64 * 1024 * 1024];
        assert_eq!(status(&huge), "HTTP/1.1 400 Bad Request");
    }
}
