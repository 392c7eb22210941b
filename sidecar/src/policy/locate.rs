//! Finds where a field path (`services.orders.endpoints[1]`) is written in a block-style YAML document, so that
//! errors found after parsing (a bad URL, a zero timeout) can name the line and column as parse errors do.
//!
//! Best effort by design: it follows indentation and `- ` items, which is how policy files are written; inside
//! flow collections (`[a, b]`, `{k: v}`) it stops at the nearest enclosing key it found.

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        // `[n]` suffixes; anything else (a `]` in a name, say) ends the part.
        while let Some(inner) = rest.strip_prefix('[') {
            let Some((index, after)) = inner.split_once(']') else {
                break;
            };
            match index.parse() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => break,
            }
            rest = after;
        }
    }
    out
}

/// One content line: its 0-based number, its indentation, whether it opens a `- ` item, and the text after
/// the indentation and the item marker.
struct Line<'a> {
    number: usize,
    indent: usize,
    item: bool,
    text: &'a str,
}

impl Line<'_> {
    /// Where the line's content starts (after a `- ` marker).
    fn content_indent(&self) -> usize {
        self.indent + if self.item { 2 } else { 0 }
    }

    fn key(&self) -> Option<&str> {
        let colon = self.text.find(':')?;
        let after = &self.text[colon + 1..];
        (after.is_empty() || after.starts_with(' ') || after.starts_with('#')).then(|| {
            self.text[..colon]
                .trim()
                .trim_matches(|c| c == '"' || c == '\'')
        })
    }
}

fn content_lines(text: &str) -> Vec<Line<'_>> {
    text.lines()
        .enumerate()
        .filter_map(|(number, raw)| {
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
                return None;
            }
            let indent = raw.len() - trimmed.len();
            let (item, text) = match trimmed.strip_prefix("- ") {
                Some(rest) => (true, rest.trim_start()),
                None => (trimmed == "-", trimmed.trim_start_matches('-')),
            };
            Some(Line {
                number,
                indent,
                item,
                text,
            })
        })
        .collect()
}

/// Where `path` is written in `text`, or the closest enclosing place that could be found.
pub fn locate(text: &str, path: &str) -> Option<Position> {
    let lines = content_lines(text);
    // The scope: lines[start..end], whose entries sit at `level` (keys at that content indentation, or items
    // whose marker is at that indentation).
    let (mut start, mut end) = (0, lines.len());
    let mut level = lines.first()?.indent;
    let mut found = None;
    for segment in segments(path) {
        let scope = start..end;
        let hit = match segment {
            Segment::Key(key) => scope
                .clone()
                .find(|&i| lines[i].content_indent() == level && lines[i].key() == Some(key)),
            Segment::Index(n) => scope
                .clone()
                .filter(|&i| lines[i].item && lines[i].indent == level)
                .nth(n),
        };
        let Some(i) = hit else {
            return found;
        };
        let line = &lines[i];
        match segment {
            Segment::Key(_) => {
                let own = line.content_indent();
                found = Some(Position {
                    line: line.number + 1,
                    column: own + 1,
                });
                // What belongs to this key: the lines after it, more indented, or items at its own indentation.
                start = i + 1;
                end = (start..end)
                    .find(|&j| lines[j].indent < own || (lines[j].indent == own && !lines[j].item))
                    .unwrap_or(end);
                match lines.get(start) {
                    Some(first) if start < end => level = first.indent,
                    _ => return found,
                }
            }
            Segment::Index(_) => {
                found = Some(Position {
                    line: line.number + 1,
                    column: line.content_indent() + 1,
                });
                // The item: its own line (content at marker + 2) and the more indented lines after it.
                start = i;
                end = (i + 1..end)
                    .find(|&j| lines[j].indent <= line.indent)
                    .unwrap_or(end);
                level = line.content_indent();
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# a policy
listeners:
  egress: 127.0.0.1:5000
services:
  orders:
    endpoints:
      - 10.0.0.1:80
      - bad
    timeouts: {request: 0}
  payments:
    endpoints: [x]
dispatch:
  rewrites:
    dev:
      patch:
      - key: Host
        val: example.com
      - key: 'bad key'
        val: x
";

    fn at(path: &str) -> (usize, usize) {
        let p = locate(DOC, path).unwrap();
        (p.line, p.column)
    }

    #[test]
    fn finds_keys_and_items_by_indentation() {
        assert_eq!(at("listeners.egress"), (3, 3));
        assert_eq!(at("services.orders.endpoints[1]"), (8, 9));
        assert_eq!(at("services.payments"), (10, 3));
        assert_eq!(at("dispatch.rewrites.dev.patch[1].key"), (18, 9));
        assert_eq!(at("dispatch.rewrites.dev.patch[0].val"), (17, 9));
    }

    #[test]
    fn stops_at_the_nearest_key_inside_flow_collections() {
        assert_eq!(at("services.orders.timeouts.request"), (9, 5));
        assert_eq!(at("services.payments.endpoints[0]"), (11, 5));
    }

    #[test]
    fn odd_names_in_paths_are_not_a_crash() {
        assert_eq!(
            locate(DOC, "services.a]b.endpoints[0]"),
            Some(Position { line: 4, column: 1 })
        );
        assert_eq!(locate(DOC, "x[[1]"), None);
    }

    #[test]
    fn unknown_paths_give_the_deepest_known_place_or_nothing() {
        assert_eq!(at("services.nope"), (4, 1));
        assert_eq!(locate(DOC, "nowhere"), None);
        assert_eq!(locate("", "a"), None);
    }
}
