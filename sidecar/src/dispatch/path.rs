//! Request path normalization before anything matches a path, as Envoy's `normalize_path` and
//! `merge_slashes` do (the class of CVE-2019-9901).
//!
//! Owns: turning a request path into the one form that authorization sees and the app receives: percent-encoded
//! unreserved characters decoded (RFC 3986 §6.2.2.2; this is what turns `%2e%2e` into `..`), slashes merged when
//! configured, dot segments removed (RFC 3986 §5.2.4). A path that would climb above the root, and by default
//! an encoded slash (`%2F`, `%5C`) or a backslash, are refused instead of guessed at. The query is never
//! touched: callers pass the path alone.
//! Does not own: where normalization applies (the mesh inbound listener, [`crate::mesh`]) or the policy keys
//! (`mesh.inbound.paths`).
//!
//! Pure and allocation-free for a path that is already normal (no `%`, no `\`, no `.` or `..` segment, no `//`
//! when merging), which is nearly every path.

use std::borrow::Cow;

use actix_http::Uri;
use actix_http::uri::PathAndQuery;

pub use crate::policy::http::{EncodedSlashes, PathOptions};

/// Why a path cannot be normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path climbs above the root with '..'")]
    AboveRoot,
    #[error("the path has a '%' that is not followed by two hex digits")]
    BadEscape,
    #[error(
        "the path has an encoded slash or a backslash (%2F, %5C or \\), refused by mesh.inbound.paths"
    )]
    EncodedSlash,
}

/// The normalized form of `path` (a path alone, without its query): borrowed when it is already normal.
/// `*` (for `OPTIONS *`) is kept; an empty path becomes `/`.
pub fn normalize(path: &str, options: PathOptions) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(if path.is_empty() {
            Cow::Borrowed("/")
        } else {
            Cow::Borrowed(path)
        });
    }
    if is_normal(path.as_bytes(), options.merge_slashes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, options.encoded_slashes)?;
    remove_dot_segments(&decoded[1..], options.merge_slashes).map(Cow::Owned)
}

/// `uri` with its path replaced by `path` (already normalized), its query and anything else kept.
pub fn with_path(uri: &Uri, path: &str) -> Result<Uri, &'static str> {
    let mut parts = uri.clone().into_parts();
    let path_and_query = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
        None => PathAndQuery::try_from(path),
    };
    parts.path_and_query =
        Some(path_and_query.map_err(|_| "the normalized path is not a valid URI path")?);
    Uri::from_parts(parts).map_err(|_| "the normalized path is not a valid URI")
}

/// The fast path, one pass over the bytes of a path that starts with `/`: no escape, no backslash, no `.` or
/// `..` segment, and no `//` when merging.
fn is_normal(path: &[u8], merge_slashes: bool) -> bool {
    let ends_segment = |at: Option<&u8>| matches!(at, None | Some(b'/'));
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' => match path.get(i + 1) {
                Some(b'/') if merge_slashes => return false,
                Some(b'.')
                    if ends_segment(path.get(i + 2))
                        || (path.get(i + 2) == Some(&b'.') && ends_segment(path.get(i + 3))) =>
                {
                    return false;
                }
                _ => {}
            },
            _ => {}
        }
    }
    true
}

/// Decodes percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`); other escapes stay as they are. A
/// `%` without two hex digits is refused: decoding around it could make a new escape, and a second decoder
/// downstream would then see another path than authorization did.
fn decode(path: &str, slashes: EncodedSlashes) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Bytes from `copied` up to `i` are passed on as they are; `%` and `\` are ASCII, so every cut falls on a
    // character boundary.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if slashes == EncodedSlashes::Reject => return Err(PathError::EncodedSlash),
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| Some((unhex(hex[0])? << 4) | unhex(hex[1])?))
                    .ok_or(PathError::BadEscape)?;
                if is_unreserved(value) {
                    out.push_str(&path[copied..i]);
                    out.push(char::from(value));
                    copied = i + 3;
                } else if (value == b'/' || value == b'\\') && slashes == EncodedSlashes::Reject {
                    return Err(PathError::EncodedSlash);
                }
                i += 3;
            }
            _ => i += 1,
        }
    }
    out.push_str(&path[copied..]);
    Ok(out)
}

fn unhex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4 on an absolute path (given without its leading `/`), except that climbing above the root is
/// an error rather than clamped: `/..` is refused, not served as `/`.
fn remove_dot_segments(rest: &str, merge_slashes: bool) -> Result<String, PathError> {
    let mut out: Vec<&str> = Vec::new();
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                if last {
                    out.push("");
                }
            }
            "" if merge_slashes && !last => {}
            s => out.push(s),
        }
    }
    if out.is_empty() {
        return Ok("/".to_string());
    }
    let mut path = String::with_capacity(rest.len() + 1);
    for segment in out {
        path.push('/');
        path.push_str(segment);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PLAIN: PathOptions = PathOptions {
        merge_slashes: false,
        encoded_slashes: EncodedSlashes::Reject,
    };
    const MERGE: PathOptions = PathOptions {
        merge_slashes: true,
        encoded_slashes: EncodedSlashes::Reject,
    };
    const ALLOW: PathOptions = PathOptions {
        merge_slashes: false,
        encoded_slashes: EncodedSlashes::Allow,
    };

    #[test]
    fn a_table_of_paths() {
        use PathError::*;
        let cases: &[(&str, PathOptions, Result<&str, PathError>)] = &[
            ("/", PLAIN, Ok("/")),
            ("", PLAIN, Ok("/")),
            ("*", PLAIN, Ok("*")),
            ("/public/x", PLAIN, Ok("/public/x")),
            ("/static/app.v1.js", PLAIN, Ok("/static/app.v1.js")),
            ("/public/../private", PLAIN, Ok("/private")),
            ("/public/%2e%2e/private", PLAIN, Ok("/private")),
            ("/public/%2E%2E/private", PLAIN, Ok("/private")),
            ("/public/.%2e/private", PLAIN, Ok("/private")),
            ("/public/%2e./private", PLAIN, Ok("/private")),
            ("/public/./../private", PLAIN, Ok("/private")),
            ("/a/./b", PLAIN, Ok("/a/b")),
            ("/./", PLAIN, Ok("/")),
            ("/.", PLAIN, Ok("/")),
            ("/a/.", PLAIN, Ok("/a/")),
            ("/a/b/..", PLAIN, Ok("/a/")),
            ("/a/..", PLAIN, Ok("/")),
            ("/a/b/../..", PLAIN, Ok("/")),
            ("/..", PLAIN, Err(AboveRoot)),
            ("/a/../..", PLAIN, Err(AboveRoot)),
            ("/%2e%2e/etc/passwd", PLAIN, Err(AboveRoot)),
            ("/a/../../b", PLAIN, Err(AboveRoot)),
            ("/a//b", PLAIN, Ok("/a//b")),
            ("/a//b", MERGE, Ok("/a/b")),
            ("//", PLAIN, Ok("//")),
            ("//", MERGE, Ok("/")),
            ("/a//../b", PLAIN, Ok("/a/b")),
            ("/a//../b", MERGE, Ok("/b")),
            ("/a/b//", MERGE, Ok("/a/b/")),
            ("/a...b/..c", PLAIN, Ok("/a...b/..c")),
            ("/...", PLAIN, Ok("/...")),
            ("/%70ublic/x", PLAIN, Ok("/public/x")),
            ("/a%20b", PLAIN, Ok("/a%20b")),
            ("/a%zz", PLAIN, Err(BadEscape)),
            ("/a%2", PLAIN, Err(BadEscape)),
            ("/%%32%65", PLAIN, Err(BadEscape)),
            ("/a%25", PLAIN, Ok("/a%25")),
            ("/%252e%252e/x", PLAIN, Ok("/%252e%252e/x")),
            ("/a%2fb", PLAIN, Err(EncodedSlash)),
            ("/a%2Fb", PLAIN, Err(EncodedSlash)),
            ("/a%5cb", PLAIN, Err(EncodedSlash)),
            ("/a\\b", PLAIN, Err(EncodedSlash)),
            ("/a%2fb/..", ALLOW, Ok("/")),
            ("/a%2F../b", ALLOW, Ok("/a%2F../b")),
            ("/a\\..\\b", ALLOW, Ok("/a\\..\\b")),
        ];
        for (path, options, expected) in cases {
            let got = normalize(path, *options);
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                *expected,
                "{path:?} with {options:?}"
            );
        }
    }

    #[test]
    fn the_query_is_kept_as_it_came() {
        let uri: Uri = "/a/./b/%2e%2e/c?x=/../y&z=%2e".parse().unwrap();
        let path = normalize(uri.path(), PLAIN).unwrap();
        assert_eq!(with_path(&uri, &path).unwrap(), "/a/c?x=/../y&z=%2e");
    }

    #[test]
    fn a_normal_path_is_borrowed_not_copied() {
        for path in ["/", "/orders/7", "/static/app.js", "/a/b/", "/a//b"] {
            assert!(
                matches!(normalize(path, PLAIN), Ok(Cow::Borrowed(_))),
                "{path}"
            );
        }
        assert!(matches!(normalize("/a/./b", PLAIN), Ok(Cow::Owned(_))));
    }

    proptest! {
        #[test]
        fn a_normalized_path_has_no_dot_segments_and_is_a_fixed_point(
            tail in proptest::collection::vec(
                prop_oneof![
                    Just("/"), Just("."), Just(".."), Just("a"), Just("%2e"), Just("%2E"), Just("%2f"),
                    Just("%5c"), Just("\\"), Just("%41"), Just("%"), Just("~"), Just("2"),
                    Just("e"), Just("%25"),
                ],
                0..16,
            ),
            merge in any::<bool>(),
            allow in any::<bool>(),
        ) {
            let path = format!("/{}", tail.concat());
            let options = PathOptions {
                merge_slashes: merge,
                encoded_slashes: if allow { EncodedSlashes::Allow } else { EncodedSlashes::Reject },
            };
            // The fast path never disagrees with the full algorithm.
            let slow = decode(&path, options.encoded_slashes)
                .and_then(|d| remove_dot_segments(&d[1..], merge));
            prop_assert_eq!(normalize(&path, options).map(Cow::into_owned), slow);
            if let Ok(normal) = normalize(&path, options) {
                prop_assert!(normal.starts_with('/'));
                for segment in normal[1..].split('/') {
                    prop_assert!(segment != "." && segment != "..", "{path:?} -> {normal:?}");
                }
                if merge {
                    prop_assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
                }
                let again = normalize(&normal, options);
                prop_assert_eq!(again.as_deref(), Ok(normal.as_ref()), "{:?}", path);
                if !normal.contains(['%', '\\']) {
                    prop_assert!(matches!(again, Ok(Cow::Borrowed(_))), "{:?} is copied again", normal);
                }
            }
        }
    }
}
