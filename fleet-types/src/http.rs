//! Small header helpers both APIs need, kept here so the hub and the agent read requests the
//! same way.

/// The header that carries a request's id from the hub to a spoke and back, so the log
/// lines of both programs about one push can be found together.
pub const REQUEST_ID: &str = "x-request-id";

/// The span an HTTP request is served in: method, path and request id (set by the caller
/// or made here). Never headers: they carry bearer tokens.
pub fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %id,
    )
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization.and_then(|v| v.strip_prefix("Bearer "))
}

/// Compares secrets without stopping at the first differing byte.
pub fn tokens_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The media type of a `Content-Type` header value, without parameters.
pub fn media_type(content_type: Option<&str>) -> &str {
    content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
        assert_eq!(
            media_type(Some("application/merge-patch+json; charset=utf-8")),
            "application/merge-patch+json"
        );
        assert_eq!(media_type(None), "");
    }
}
