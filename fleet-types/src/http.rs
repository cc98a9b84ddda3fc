//! Small header helpers both APIs need, kept here so the hub and the agent read requests the
//! same way.

/// The header that carries a request's id from the hub to a spoke and back, so the log
/// lines of both programs about one push can be found together.
pub const REQUEST_ID: &str = "x-request-id";

/// `Prefer` (RFC 7240), and the preference the hub sends with its pushes: answer a change
/// without the changed object, which the hub does not read.
pub const PREFER: &str = "prefer";
pub const PREFERENCE_APPLIED: &str = "preference-applied";
pub const RETURN_MINIMAL: &str = "return=minimal";

/// Whether `Prefer` header values ask for `return=minimal` (names and values compared
/// without case; parameters after `;` and a quoted value allowed).
pub fn prefers_minimal<'a>(values: impl IntoIterator<Item = &'a str>) -> bool {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.split(';').next()?.split_once('='))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("return")
                && value
                    .trim()
                    .trim_matches('"')
                    .eq_ignore_ascii_case("minimal")
        })
}

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

/// The token of an `Authorization: Bearer <token>` header value; the scheme's name is
/// matched without case (RFC 9110, section 11.1).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
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
    fn the_bearer_scheme_is_matched_without_case() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("BEARER  abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

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

    #[test]
    fn prefer_return_minimal() {
        assert!(prefers_minimal(["return=minimal"]));
        assert!(prefers_minimal([
            "respond-async, Return = \"Minimal\"; x=1"
        ]));
        assert!(prefers_minimal(["wait=10", "return=minimal"]));
        assert!(!prefers_minimal(["return=representation"]));
        assert!(!prefers_minimal(["minimal", "returns=minimal"]));
        assert!(!prefers_minimal([]));
    }
}
