//! The documentation and the shipped policies cannot rot: every YAML example in `docs/` and every file in
//! `policies/` must be accepted, as a policy or as a seed dispatcher `config.yaml`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::path::{Path, PathBuf};

use sidecar::policy::Policy;
use sidecar::policy::seed::DispatchRules;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```yaml") => {
                current = Some((n + 1, String::new()))
            }
            Some(_) if line.trim_start().starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

fn accepted(name: &str, text: &str) -> Result<(), String> {
    let as_policy = Policy::from_yaml(name, text);
    let as_seed = DispatchRules::from_seed_yaml(name, text);
    match (as_policy, as_seed) {
        (Ok(_), _) | (_, Ok(_)) => Ok(()),
        (Err(p), Err(s)) => Err(format!("as a policy: {p}\nas a seed config: {s}")),
    }
}

#[test]
fn every_yaml_example_in_the_docs_is_accepted() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, block) in yaml_blocks(&text) {
            let name = format!("{}:{line}", path.display());
            if let Err(e) = accepted(&name, &block) {
                panic!("the example at {name} is rejected:\n{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} examples found");
}

#[test]
fn every_file_in_policies_is_accepted() {
    let dir = repo().join("policies");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = accepted(&path.display().to_string(), &text) {
            panic!("{} is rejected:\n{e}", path.display());
        }
    }
    Policy::load(&dir).expect("the policies directory loads as a whole");
}

#[test]
fn the_compose_policies_are_accepted() {
    let dir = repo().join("compose").join("policies");
    let mut checked = 0;
    for service in std::fs::read_dir(&dir).unwrap() {
        let service = service.unwrap().path();
        Policy::load(&service)
            .unwrap_or_else(|e| panic!("{} is rejected:\n{e}", service.display()));
        checked += 1;
    }
    assert_eq!(checked, 2, "orders and payments");
}

/// The names in `**bold**` on a line, in order.
fn bold(line: &str) -> Vec<String> {
    line.split("**")
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_request_path_doc_lists_the_codes_phases_in_order() {
    let doc = std::fs::read_to_string(repo().join("docs/request-path.md")).unwrap();
    let phases: Vec<String> = sidecar::dispatch::PHASES
        .iter()
        .map(|p| p.to_string())
        .collect();

    // The one list: the numbered items of the "Phases" section.
    let section = doc.split("\n## Phases\n").nth(1).expect("a Phases section");
    let section = section.split("\n## ").next().unwrap_or_default();
    let listed: Vec<String> = section
        .lines()
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .filter_map(|l| bold(l).into_iter().next())
        .collect();
    assert_eq!(listed, phases, "the numbered list of docs/request-path.md");

    // The table: one row per phase, in the same order, and the attempt row names its steps in order.
    let rows: Vec<&str> = section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| phase") && !l.starts_with("|---"))
        .collect();
    let named: Vec<String> = rows
        .iter()
        .filter_map(|r| r.split('|').nth(1).map(|c| c.trim().to_string()))
        .collect();
    assert_eq!(named, phases, "the table of docs/request-path.md");
    let attempt = rows.iter().find(|r| r.starts_with("| attempt ")).unwrap();
    let steps: Vec<String> = sidecar::dispatch::ATTEMPT_STEPS
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(bold(attempt), steps, "the attempt row's steps");

    // The chart names every phase, in order, on one line.
    let chart = section
        .lines()
        .find(|l| l.contains("[codec]"))
        .expect("the chart");
    let mut at = 0;
    for phase in &phases {
        let found = chart[at..].find(phase.as_str()).map(|i| i + at);
        at = found.unwrap_or_else(|| panic!("the chart names {phase} after the phases before it"));
    }

    // And each phase is a module of its own, named for it.
    for phase in &phases {
        let file = repo().join(format!("sidecar/src/dispatch/{phase}.rs"));
        assert!(
            file.exists(),
            "{} is the {phase} phase's module",
            file.display()
        );
    }
}
