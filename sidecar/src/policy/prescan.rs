//! A cheap look at a policy's text before the YAML parser sees it.
//!
//! Owns two refusals that the parser cannot make well: a document nested absurdly deep (the parser's time grows
//! with the square of the depth: a flow sequence 100,000 deep kept it busy past 10 s), and a file with nothing
//! in it (an editor that truncates and then writes leaves such a file for a moment; applied, it would be an
//! empty policy with every service unknown). Called by [`super::Policy`] and [`super::seed`] on each text
//! before parsing.
//!
//! The depth scan is linear and approximate on purpose: it counts flow brackets (`[`, `{`) outside quoted
//! scalars and comments, block indentation levels, and `- ` items opened on one line. It may count a little
//! less than the parser's depth for some block styles, never more than one level per real level, so the limit
//! refuses only documents no operator writes.

use super::errors::PolicyErrors;

/// Nesting deeper than this is refused before parsing. Real policies stay under ten levels.
pub const MAX_DEPTH: usize = 64;

/// Refuses a text nested deeper than [`MAX_DEPTH`], naming where the limit was passed.
pub(crate) fn check_depth(source: &str, text: &str) -> Result<(), PolicyErrors> {
    match deepest(text) {
        Some((line, column)) => Err(PolicyErrors::one(format!(
            "{source}:{line}:{column}: nested more than {MAX_DEPTH} levels deep; refused before parsing \
             (a policy never needs that depth)"
        ))),
        None => Ok(()),
    }
}

/// Refuses a text with nothing but whitespace, comments and document markers in it.
pub(crate) fn check_not_blank(source: &str, text: &str) -> Result<(), PolicyErrors> {
    let blank = text.lines().all(|line| {
        let line = line.trim_start_matches('\u{feff}').trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    });
    if blank {
        return Err(PolicyErrors::one(format!(
            "{source}: the policy file is empty (only whitespace or comments); refused (write `{{}}` for a \
             policy with nothing in it)"
        )));
    }
    Ok(())
}

/// The 1-based line and column where the nesting first passes [`MAX_DEPTH`], if it does.
fn deepest(text: &str) -> Option<(usize, usize)> {
    // Open flow collections, the indentations of open block levels, an open quoted scalar (its quote), and the
    // indentation of the line that opened a block scalar (`|` or `>`), whose more indented lines are text.
    let mut flow = 0usize;
    let mut block: Vec<usize> = Vec::new();
    let mut quote: Option<u8> = None;
    let mut block_scalar: Option<usize> = None;
    for (number, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let rest = &bytes[indent..];
        let mut start = 0;
        if quote.is_none() && flow == 0 {
            if let Some(parent) = block_scalar {
                if rest.is_empty() || indent > parent {
                    continue;
                }
                block_scalar = None;
            }
            if rest.is_empty() || rest[0] == b'#' {
                continue;
            }
            if rest.starts_with(b"---") || rest.starts_with(b"...") {
                block.clear();
                continue;
            }
            while block.last().is_some_and(|&top| top >= indent) {
                block.pop();
            }
            block.push(indent);
            start = indent;
        }
        let mut node_start = quote.is_none();
        let mut after_space = true;
        let mut i = start;
        while i < bytes.len() {
            let c = bytes[i];
            let next = bytes.get(i + 1).copied();
            let space_or_end = |b: Option<u8>| matches!(b, None | Some(b' ' | b'\t'));
            if let Some(q) = quote {
                match c {
                    b'\\' if q == b'"' => i += 1,
                    b'\'' if q == b'\'' && next == Some(b'\'') => i += 1,
                    _ if c == q => quote = None,
                    _ => {}
                }
                i += 1;
                after_space = false;
                continue;
            }
            match c {
                b' ' | b'\t' => {
                    after_space = true;
                    i += 1;
                    continue;
                }
                b'#' if after_space => break,
                b'"' | b'\'' if node_start => {
                    quote = Some(c);
                    node_start = false;
                }
                b'[' | b'{' if node_start || flow > 0 => {
                    flow += 1;
                    node_start = true;
                }
                b']' | b'}' if flow > 0 => {
                    flow -= 1;
                    node_start = false;
                }
                b',' if flow > 0 => node_start = true,
                b'-' | b'?' if node_start && flow == 0 && space_or_end(next) => {
                    if block.last().is_none_or(|&top| i > top) {
                        block.push(i);
                    }
                }
                b':' if flow > 0 || space_or_end(next) => node_start = true,
                b'|' | b'>' if node_start && flow == 0 => {
                    block_scalar = Some(indent);
                    break;
                }
                _ => node_start = false,
            }
            after_space = false;
            if flow + block.len() > MAX_DEPTH {
                return Some((number + 1, i + 1));
            }
            i += 1;
        }
        if flow + block.len() > MAX_DEPTH {
            return Some((number + 1, bytes.len().max(1)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str) -> bool {
        deepest(text).is_none()
    }

    #[test]
    fn deep_flow_and_block_nesting_is_found_where_it_passes_the_limit() {
        let flow = format!("a: {}1{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(deepest(&flow), Some((1, 4 + MAX_DEPTH - 1)));
        let items = format!("{}x", "- ".repeat(100));
        assert_eq!(deepest(&items), Some((1, 2 * MAX_DEPTH + 1)));
        let indented: String = (0..100).map(|d| format!("{}k:\n", " ".repeat(d))).collect();
        assert_eq!(deepest(&indented).map(|p| p.0), Some(MAX_DEPTH + 1));
    }

    #[test]
    fn brackets_in_quotes_comments_plain_scalars_and_block_scalars_do_not_count() {
        let deep = "[".repeat(200);
        assert!(depth_ok(&format!("a: \"{deep}\"\n")));
        assert!(depth_ok(&format!("a: '{deep}''{deep}'\n")));
        assert!(depth_ok(&format!("a: 1 # {deep}\n")));
        assert!(depth_ok(&format!("a: x{deep}\n")));
        assert!(depth_ok(&format!("a: don't {deep}\n")));
        let text: String = (0..100)
            .map(|d| format!("  {}{deep}\n", " ".repeat(d)))
            .collect();
        assert!(depth_ok(&format!("a: |\n{text}b: 1\n")));
        assert!(!depth_ok(&format!("a: |\n{text}b: {deep}\n")));
    }

    #[test]
    fn ordinary_nesting_passes() {
        let legit = "services:\n  orders:\n    endpoints: ['h:1', \"h:2\"]\n    retries: {on: [reset, 503]}\n    \
                     health_check:\n      path: /healthz\ndispatch:\n  rewrites:\n    dev:\n      patch:\n      - key: Host\n        val: x\n";
        assert!(depth_ok(legit));
        let nested = format!("a: {}1{}", "[".repeat(60), "]".repeat(60));
        assert!(depth_ok(&nested));
    }

    #[test]
    fn blank_texts_are_refused_and_an_explicit_empty_mapping_is_not() {
        for text in [
            "",
            "\n\n",
            "   \n\t\n",
            "# only\n  # comments\n",
            "---\n# x\n...\n",
            "\u{feff}\n",
        ] {
            assert!(check_not_blank("p.yaml", text).is_err(), "{text:?}");
        }
        assert!(check_not_blank("p.yaml", "{}").is_ok());
        assert!(check_not_blank("p.yaml", "services: {}\n").is_ok());
    }
}
