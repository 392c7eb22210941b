//! The layering holds: the files of `sidecar/src` import each other in no circle of more than four files
//! (issue 16 item 2: they were one circle of 23).
//!
//! How it is measured: every file is a node; a file has an edge to the file of each module one of its paths
//! names (`crate::`, `super::`, `self::`, or a child module's name), whether in a `use` (groups expanded) or
//! inline, comments, strings and `#[cfg(test)]` modules left out; a path names the deepest module that is a
//! file. `mod` declarations are not edges. The largest strongly connected component (Tarjan) is the largest
//! import circle.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The largest import circle allowed.
const MAX_CIRCLE: usize = 4;

type Module = Vec<String>;

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `a/b.rs` and `a/b/mod.rs` are module `a::b`; `lib.rs` is the crate root.
fn module_of(root: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code without comments, string and char literals, and without the `#[cfg(test)]` module at the end.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let close = if rest.starts_with("r#") { "\"#" } else { "\"" };
            let open = if rest.starts_with("r#") { 3 } else { 2 };
            i += open
                + rest[open..]
                    .find(close)
                    .map_or(rest.len(), |e| e + close.len());
            out.push_str("\"\"");
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else if bytes[i] == b'\''
            && rest.len() > 2
            && (bytes[i + 2] == b'\'' || bytes[i + 1] == b'\\')
        {
            // A char literal ('x' or '\n'); lifetimes have no closing quote here.
            i += rest[1..].find('\'').map_or(1, |e| e + 2);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Inside an inline `mod name { ... }`, `super` is the file's own module: spelled `self` here, so that it
/// names no other file.
fn inline_modules_flattened(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(at) = out[from..].find("mod ") {
        let start = from + at;
        from = start + 4;
        if out[..start].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let head: String = out[from..]
            .chars()
            .take_while(|&c| is_ident(c) || c.is_whitespace())
            .collect();
        if !out[from + head.len()..].starts_with('{') {
            continue;
        }
        let open = from + head.len();
        let mut depth = 0;
        let mut close = out.len();
        for (i, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = out[open..close].replace("super::", "self::");
        out.replace_range(open..close, &body);
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into paths.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = &tree[..open];
    let body = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut items, mut current, mut depth) = (Vec::new(), String::new(), 0);
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            items.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
        .iter()
        .filter(|i| !i.is_empty())
        .flat_map(|i| expand(i))
        .map(|p| format!("{prefix}{p}"))
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths of `use` items and the inline paths starting with `crate`, `super`, `self` or a child's name.
fn paths_in(code: &str, children: &BTreeSet<String>) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + 4..];
        if before.is_some_and(is_ident) {
            continue;
        }
        let end = rest.find(';').unwrap_or(rest.len());
        // Whitespace only matters around `as`.
        let words: Vec<&str> = rest[..end].split_whitespace().collect();
        let tree = words
            .join(" ")
            .replace(" as ", "\u{0}")
            .replace(' ', "")
            .replace('\u{0}', " as ");
        paths.extend(expand(&tree));
    }
    // Inline paths: an identifier followed by `::`, not itself preceded by `::` or an identifier.
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            let start = i;
            while i < chars.len()
                && (is_ident(chars[i]) || (chars[i] == ':' && chars.get(i + 1) == Some(&':')))
            {
                i += if chars[i] == ':' { 2 } else { 1 };
            }
            let path: String = chars[start..i].iter().collect();
            let head = path.split("::").next().unwrap_or("");
            if path.contains("::")
                && (matches!(head, "crate" | "super" | "self") || children.contains(head))
            {
                paths.push(path);
            }
        } else {
            i += 1;
        }
    }
    paths
}

fn resolve(
    from: &Module,
    path: &str,
    children: &BTreeSet<String>,
    modules: &BTreeSet<Module>,
) -> Option<Module> {
    let path = path.split(" as ").next().unwrap_or(path);
    let mut segments = path.split("::").filter(|s| !s.is_empty()).peekable();
    let mut base: Module = match segments.peek().copied() {
        Some("crate") => {
            segments.next();
            Vec::new()
        }
        Some("super" | "self") => {
            let mut base = from.clone();
            while let Some(&s) = segments.peek() {
                match s {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.next();
            }
            base
        }
        Some(head) if children.contains(head) => from.clone(),
        _ => return None,
    };
    let mut deepest = modules.contains(&base).then(|| base.clone());
    for s in segments {
        base.push(s.to_string());
        if modules.contains(&base) {
            deepest = Some(base.clone());
        }
    }
    deepest.filter(|m| m != from)
}

/// The import graph of the files under `root`, by module.
fn graph(root: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    source_files(root, &mut files);
    files.retain(|f| f.file_name().is_some_and(|n| n != "main.rs") || f.parent() != Some(root));
    let modules: BTreeMap<Module, PathBuf> = files
        .into_iter()
        .map(|f| (module_of(root, &f), f))
        .collect();
    let names: BTreeSet<Module> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(module, file)| {
            let code = inline_modules_flattened(&code_of(&std::fs::read_to_string(file).unwrap()));
            let children: BTreeSet<String> = names
                .iter()
                .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
                .map(|m| m[module.len()].clone())
                .collect();
            let edges = paths_in(&code, &children)
                .iter()
                .filter_map(|p| resolve(module, p, &children, &names))
                .collect();
            (module.clone(), edges)
        })
        .collect()
}

/// Strongly connected components (Tarjan), largest first.
fn circles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            s.found.push(component);
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.found.sort_by_key(|c| std::cmp::Reverse(c.len()));
    state.found
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_import_circle_is_larger_than_four_files() {
    // `LAYERS_SRC` measures another tree (an older commit's `sidecar/src`, for before/after figures).
    let root = std::env::var_os("LAYERS_SRC").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        PathBuf::from,
    );
    let graph = graph(&root);
    assert!(
        graph.len() > 20,
        "the source files were found: {}",
        graph.len()
    );
    let largest = circles(&graph).into_iter().next().unwrap_or_default();
    let names: Vec<String> = largest.iter().map(name).collect();
    println!("largest import circle: {} files: {names:?}", largest.len());
    assert!(
        largest.len() <= MAX_CIRCLE,
        "an import circle of {} files (at most {MAX_CIRCLE}): {names:?}",
        largest.len()
    );
}

#[test]
fn the_measure_finds_a_circle_through_super_and_crate_paths() {
    let dir = std::env::temp_dir().join(format!("sidecar-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(
        dir.join("a/mod.rs"),
        "pub mod x;\nuse crate::b::{B, c::C};\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("a/x.rs"),
        "// crate::b\nfn f() { let s = \"crate::b\"; }\nmod inner {\n    use super::*;\n}\n",
    )
    .unwrap();
    std::fs::write(dir.join("b.rs"), "pub fn g() { crate::a::h(); }\n").unwrap();
    let graph = graph(&dir);
    let largest = circles(&graph).into_iter().next().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let mut names: Vec<String> = largest.iter().map(name).collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "{graph:?}");
}
