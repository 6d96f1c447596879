//! The documents a clone ships: every relative link in README.md, docs/ and web/README.md leads
//! to a file of the repository and, with `#anchor`, to one of its headings (GitHub's slugs);
//! nothing points outside the repository; the README stays an introduction (≤ 10 KB).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md"), root().join("web/README.md")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// Text outside fenced code blocks (a link inside one is an example, not a link).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens; a
/// repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for line in prose(text).lines() {
        let Some(title) = line.strip_prefix('#').map(|t| t.trim_start_matches('#').trim()) else {
            continue;
        };
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.push(if *n == 0 { slug.clone() } else { format!("{slug}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of a document's inline links `[text](target)`.
fn links(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    re.captures_iter(&prose(text)).map(|c| c[1].to_string()).collect()
}

fn check_link(doc: &Path, target: &str, problems: &mut Vec<String>) {
    if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
        return;
    }
    let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
    let path = if file.is_empty() { doc.to_path_buf() } else { doc.parent().unwrap().join(file) };
    let name = doc.strip_prefix(root()).unwrap().display();
    let Ok(path) = path.canonicalize() else {
        problems.push(format!("{name}: ({target}) names no file"));
        return;
    };
    if !path.starts_with(root().canonicalize().unwrap()) {
        problems.push(format!("{name}: ({target}) points outside the repository"));
        return;
    }
    if !anchor.is_empty() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !anchors(&text).iter().any(|a| a == anchor) {
            problems.push(format!("{name}: ({target}) names no heading of {}", path.display()));
        }
    }
}

#[test]
fn every_link_in_the_documents_leads_somewhere_in_the_repository() {
    let mut problems = Vec::new();
    let mut count = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        if text.contains("../shared/") {
            problems.push(format!("{}: cites ../shared/, which a clone does not have", doc.display()));
        }
        for target in links(&text) {
            count += 1;
            check_link(&doc, &target, &mut problems);
        }
    }
    assert!(count > 50, "only {count} links found: the link pattern broke");
    assert!(problems.is_empty(), "{} broken links:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_readme_is_an_introduction() {
    let bytes = std::fs::metadata(root().join("README.md")).unwrap().len();
    assert!(bytes <= 10_000, "README.md is {bytes} bytes: move detail into docs/ (≤ 10 KB)");
}

#[test]
fn anchors_follow_github() {
    let text = "# The `bench` command: speed\n## Sizes, worth knowing\n## LoRA\n## LoRA\n```\n# not a heading\n```\n";
    assert_eq!(anchors(text), ["the-bench-command-speed", "sizes-worth-knowing", "lora", "lora-1"]);
}
