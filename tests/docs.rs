//! The documents a clone ships: every relative link in README.md, docs/ and web/README.md leads
//! to a file of the repository and, with `#anchor`, to one of its headings (GitHub's slugs);
//! nothing points outside the repository; the README stays an introduction (≤ 10 KB); its
//! library snippet is the crate's compiled doc example, whose features pull no command-line
//! crates; and USAGE.md's examples of output are what the code prints for them.

mod common;

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

/// The fenced block of `lang` that follows the line holding `after` in `text`.
fn block_after(text: &str, after: &str, lang: &str) -> String {
    let from = text.find(after).unwrap_or_else(|| panic!("{after:?} not found"));
    let open = format!("```{lang}\n");
    let start = from + text[from..].find(&open).expect("a fenced block") + open.len();
    let end = start + text[start..].find("```").expect("its end");
    text[start..end].to_string()
}

#[test]
fn the_readme_library_snippet_is_the_compiled_doc_example() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let snippet = block_after(&readme, "## As a library", "rust");
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    // The crate's doc example (compiled by `cargo test --doc`), without its hidden lines.
    let doc: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let example = block_after(&doc, "The whole of an embedding app's fine-tuning", "no_run");
    let shown: String = example.lines().filter(|l| !l.starts_with("# ")).map(|l| format!("{l}\n")).collect();
    assert_eq!(snippet, shown, "README.md's library snippet differs from src/lib.rs's doc example");
    assert!(snippet.contains("fn main() -> Result<(), Box<dyn std::error::Error>>") && snippet.contains("pollster"));
    assert!(readme.contains(
        r#"default-features = false, features =
["native"]"#
    ));
}

#[test]
fn the_library_feature_pulls_no_command_line_crates() {
    let toml = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let native = toml.lines().find(|l| l.starts_with("native = [")).expect("the native feature");
    for dep in ["clap", "indicatif", "toml", "ctrlc", "pollster"] {
        assert!(!native.contains(&format!("dep:{dep}")), "the native feature pulls {dep}: {native}");
    }
    let bin = &toml[toml.find("[[bin]]").expect("the binary")..];
    assert!(bin.contains(r#"required-features = ["cli"]"#), "the binary needs the cli feature");
}

/// USAGE.md's examples of output, each computed here as the code computes it: the data line of
/// Hamlet on SmolLM2 and `tokenize`'s rendering of a two-turn conversation.
#[test]
fn usage_shows_what_the_code_prints() {
    let (Some(model), Some(hamlet)) = (common::smollm2_path(), common::hamlet_path()) else { return };
    let usage = std::fs::read_to_string(root().join("docs/USAGE.md")).unwrap();
    let tok = portalora::io::tokenizer::Tokenizer::for_model(&model).unwrap();
    let ds = portalora::data::load(&hamlet, &tok, 128, 0.1, 0).unwrap();
    let line = format!("data: {}", ds.summary);
    assert!(usage.contains(&format!("\n  {line}\n")), "USAGE.md's data line for Hamlet should read:\n{line}");
    let dir = std::env::temp_dir().join(format!("portalora-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chat = dir.join("chat.jsonl");
    let turns = r#"[{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]"#;
    std::fs::write(&chat, format!("{{\"messages\": {turns}}}\n")).unwrap();
    let opts = portalora::data::ChatOptions { model: "SmolLM2", ..Default::default() };
    let (docs, _) = portalora::data::tokenized_documents(&chat, &tok, &opts).unwrap();
    let runs = portalora::data::target_runs(&tok, &docs[0]).unwrap();
    let shown: String = runs.iter().map(|(t, on)| if *on { format!("[[{t}]]") } else { t.clone() }).collect();
    std::fs::remove_dir_all(&dir).unwrap();
    let block = block_after(&usage, "For SmolLM2 and a two-turn conversation", "");
    let doc: String = block.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).collect::<Vec<_>>().join("\n");
    assert_eq!(doc.trim_end(), shown.trim_end(), "USAGE.md's tokenize example should read:\n{shown}");
}
