//! What is wrong with a policy: the issues found, where they are, and how they are rendered. Imports nothing
//! of the policy model, so every part of the model can report problems without importing it back.

use std::fmt;

/// Every problem found in a policy, each on its own line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors {
    pub errors: Vec<String>,
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(e)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl PolicyErrors {
    pub(crate) fn one(message: impl Into<String>) -> Self {
        Self {
            errors: vec![message.into()],
        }
    }

    /// Renders issues as `file:line:column: field: reason`, finding each field in its file's text.
    pub(crate) fn render(issues: Vec<Issue>, sources: &Sources) -> Self {
        let errors = issues
            .into_iter()
            .map(|i| {
                let position = sources
                    .text(&i.file)
                    .and_then(|t| super::locate::locate(t, &i.path));
                match position {
                    Some(p) => format!(
                        "{}:{}:{}: {}: {}",
                        i.file, p.line, p.column, i.path, i.message
                    ),
                    None => format!("{}: {}: {}", i.file, i.path, i.message),
                }
            })
            .collect();
        Self { errors }
    }
}

/// One problem found after parsing: the file, the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    pub file: String,
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn new(file: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The texts of the files a policy was read from, by the name used in messages.
#[derive(Debug, Default)]
pub(crate) struct Sources(Vec<(String, String)>);

impl Sources {
    pub fn one(name: &str, text: &str) -> Self {
        Self(vec![(name.to_string(), text.to_string())])
    }

    /// Adds a file's text under the name used in messages.
    pub(crate) fn push(&mut self, name: String, text: String) {
        self.0.push((name, text));
    }

    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    /// FNV-1a over names and contents: stable across builds and machines.
    pub(crate) fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, text) in &self.0 {
            for b in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

/// Formats a YAML/serde error as `file:line:column: message`.
pub(crate) fn yaml_error(source: &str, e: &yaml_serde::Error) -> PolicyErrors {
    let message = e.to_string();
    // yaml_serde appends " at line L column C" to its message; we lead with it instead.
    let mut message = match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    if let Some(hint) = did_you_mean(&message) {
        message.push_str(&format!("; did you mean `{hint}`?"));
    }
    match e.location() {
        Some(loc) => PolicyErrors::one(format!(
            "{source}:{}:{}: {message}",
            loc.line(),
            loc.column()
        )),
        None => PolicyErrors::one(format!("{source}: {message}")),
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" message: the expected name closest to `x`, when
/// one is close enough to be a typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|candidate| (edit_distance(unknown, candidate), candidate))
        .filter(|&(d, c)| d > 0 && d <= 2.max(c.len() / 3))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c.to_string())
}

/// Levenshtein distance, for typo hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}
