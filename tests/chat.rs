//! Chat data (issue 17): conversations in the OpenAI messages, ShareGPT and Alpaca formats,
//! rendered with a chat template and tokenized, against transformers' `apply_chat_template`
//! (tests/fixtures/gen_chat.py: ChatML from SmolLM2's GGUF, Llama 3's and Gemma 3's templates),
//! the assistant-only targets against a reference that renders prefixes, and the refusals.

mod common;

use std::path::Path;

use common::{fixture, json};
use portalora::data::{self, ChatOptions, TrainOn};
use portalora::io::tokenizer::Tokenizer;

fn model_path(name: &str) -> Option<std::path::PathBuf> {
    match name {
        "smollm2" => common::smollm2_path(),
        "gemma3-270m" => common::gemma3_path(),
        other => panic!("unknown model {other}"),
    }
}

#[test]
fn rendered_ids_and_targets_equal_transformers() {
    let e = json(&fixture("chat/expected.json"));
    for case in e["cases"].as_array().unwrap() {
        let Some(model) = model_path(case["model"].as_str().unwrap()) else { return };
        let tok = Tokenizer::for_model(&model).unwrap();
        let template = case["template"].as_str().map(|t| fixture(&format!("chat/{t}")));
        let data = fixture(&format!("chat/{}", case["data"].as_str().unwrap()));
        let what = format!("{} / {:?} / {}", case["model"], case["template"], case["data"]);
        for train_on in [TrainOn::Assistant, TrainOn::All] {
            let opts = ChatOptions { template_file: template.as_deref(), train_on, model: "m", given: &[] };
            let (docs, _) = data::tokenized_documents(&data, &tok, &opts).unwrap();
            let want = case["docs"].as_array().unwrap();
            assert_eq!(docs.len(), want.len(), "{what}");
            for (i, (got, want)) in docs.iter().zip(want).enumerate() {
                let ids: Vec<u32> =
                    want["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                assert_eq!(got.ids, ids, "{what}: document {i} ids (text {:?})", want["text"]);
                let targets: Vec<bool> = match train_on {
                    TrainOn::Assistant => want["targets"].as_array().unwrap().iter().map(|v| v == 1).collect(),
                    // Every token but the first, which nothing before it predicts.
                    TrainOn::All => (0..ids.len()).map(|i| i > 0).collect(),
                };
                assert_eq!(got.predict, targets, "{what}: document {i} targets with {train_on:?}");
            }
        }
    }
}

/// A small byte-level tokenizer (no chat template of its own) and a data file written here.
fn setup(name: &str, lines: &[&str]) -> (Tokenizer, std::path::PathBuf) {
    let tok = Tokenizer::for_model(&fixture("tokenizers/qwen2.gguf")).unwrap();
    let dir = common::tmp(name);
    let file = dir.join("data.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    (tok, file)
}

fn load_err(tok: &Tokenizer, file: &Path, template: Option<&Path>) -> String {
    let opts = ChatOptions { template_file: template, train_on: TrainOn::Assistant, model: "tiny.gguf", given: &[] };
    data::tokenized_documents(file, tok, &opts).unwrap_err().to_string()
}

#[test]
fn bad_chat_data_is_refused_in_words() {
    let chatml = fixture("chat/llama3.jinja");
    let (tok, file) = setup(
        "chat_mixed",
        &[
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
            r#"{"conversations": [{"from": "human", "value": "hi"}]}"#,
        ],
    );
    let e = load_err(&tok, &file, Some(&chatml));
    assert!(e.contains("data.jsonl:2") && e.contains("ShareGPT") && e.contains("line 1 is messages"), "{e}");
    let (tok, file) = setup("chat_role", &[r#"{"messages": [{"role": "tool", "content": "x"}]}"#]);
    let e = load_err(&tok, &file, Some(&chatml));
    assert!(e.contains("data.jsonl:1") && e.contains("messages[0].role is \"tool\""), "{e}");
    let (tok, file) = setup("chat_content", &[r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#]);
    let e = load_err(&tok, &file, Some(&chatml));
    assert!(e.contains("messages[0].content is a list"), "{e}");
    // Keys that would change what is trained are refused, not dropped.
    for (name, line, want) in [
        (
            "chat_two_formats",
            r#"{"text": "t", "prompt": "p", "completion": "c"}"#,
            "holds \"prompt\" and \"completion\" beside \"text\"",
        ),
        (
            "chat_weight",
            r#"{"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]}"#,
            "messages[0].weight = 0.5",
        ),
        (
            "chat_tool_calls",
            r#"{"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}"#,
            "tool calls",
        ),
        (
            "chat_tools",
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
            "\"tools\": tool definitions",
        ),
        (
            "chat_name",
            r#"{"conversations": [{"from": "human", "value": "x", "name": "Ann"}]}"#,
            "conversations[0].name",
        ),
        (
            "chat_system_type",
            r#"{"system": 3, "conversations": [{"from": "human", "value": "x"}]}"#,
            "\"system\" is not a string",
        ),
        (
            "chat_system_twice",
            r#"{"system": "a", "conversations": [{"from": "system", "value": "b"}, {"from": "human", "value": "x"}]}"#,
            "a \"system\" prompt and a system turn first",
        ),
    ] {
        let (tok, file) = setup(name, &[line]);
        let e = load_err(&tok, &file, Some(&chatml));
        assert!(e.contains("data.jsonl:1") && e.contains(want), "{name}: {e}");
    }
    let (tok, file) = setup("chat_no_template", &[r#"{"messages": [{"role": "user", "content": "hi"}]}"#]);
    let e = load_err(&tok, &file, None);
    assert!(e.contains("tiny.gguf has no chat template") && e.contains("--chat-template"), "{e}");
    let dir = common::tmp("chat_templates");
    let raises = dir.join("raises.jinja");
    std::fs::write(
        &raises,
        "{% if messages[0]['role'] == 'user' %}{{ raise_exception('user turns first? never') }}{% endif %}",
    )
    .unwrap();
    let e = load_err(&tok, &file, Some(&raises));
    assert!(e.contains("raised: user turns first? never") && e.contains("data.jsonl:1"), "{e}");
    let broken = dir.join("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}\n{{ m.content }\n{% endfor %}").unwrap();
    let e = load_err(&tok, &file, Some(&broken));
    assert!(e.contains("broken.jinja") && e.contains("does not parse") && e.contains("line 2"), "{e}");
}

#[test]
fn a_conversation_without_an_assistant_turn_is_counted() {
    let (tok, file) = setup(
        "chat_counted",
        &[
            r#"{"messages": [{"role": "user", "content": "a question"}]}"#,
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}]}"#,
        ],
    );
    let t = fixture("chat/llama3.jinja");
    let opts = ChatOptions { template_file: Some(&t), train_on: TrainOn::Assistant, model: "m", given: &[] };
    let ds = data::load_with(&file, &tok, &opts, data::Packing::Packed, 4, 0.0, 0).unwrap();
    assert_eq!(ds.summary.no_assistant, 1);
    assert!(ds.summary.to_string().contains("1 conversation(s) without an assistant turn"), "{}", ds.summary);
    let (docs, _) = data::tokenized_documents(&file, &tok, &opts).unwrap();
    assert!(docs[0].no_assistant && !docs[0].predict.iter().any(|&p| p));
    assert!(docs[1].predict.iter().any(|&p| p));
}

#[test]
fn chat_flags_without_conversations_are_refused() {
    let (tok, file) = setup("chat_unused", &[r#"{"text": "plain text"}"#]);
    let opts = ChatOptions { template_file: None, train_on: TrainOn::All, model: "m", given: &["--train-on"] };
    let e = data::tokenized_documents(&file, &tok, &opts).unwrap_err().to_string();
    assert!(e.contains("holds no conversations, so --train-on would be ignored"), "{e}");
}

/// `portalora generate --chat --system` on SmolLM2 renders the template with the assistant's turn
/// opened and stops at its end of turn: transformers' greedy reply (gen_chat.py).
#[test]
fn generate_chat_replies_as_transformers() {
    let Some(model) = common::smollm2_path() else { return };
    if common::context().is_none() {
        return;
    }
    let e = &json(&fixture("chat/expected.json"))["generate"];
    let msgs = e["messages"].as_array().unwrap();
    let o = common::bin()
        .args(["generate", "--model", model.to_str().unwrap(), "--max-tokens", "24"])
        .args(["--system", msgs[0]["content"].as_str().unwrap(), "--chat", msgs[1]["content"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = String::from_utf8_lossy(&o.stdout);
    assert_eq!(got.trim_end(), e["text"].as_str().unwrap(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    // The greedy reply ended at <|im_end|> before --max-tokens: no "stopped" note.
    assert!(e["greedy"].as_array().unwrap().len() < 24 && !String::from_utf8_lossy(&o.stderr).contains("stopped"));
}

/// ShareGPT's and Alpaca's `system` prompt is the conversation's first turn, as a messages line
/// with a system turn renders it; keys no format reads (`id`, `source`) are named in the summary.
#[test]
fn system_prompts_come_first_and_unread_keys_are_said() {
    let t = fixture("chat/llama3.jinja");
    let opts = ChatOptions { template_file: Some(&t), train_on: TrainOn::Assistant, model: "m", given: &[] };
    let (tok, messages) = setup(
        "chat_sys_messages",
        &[
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A test."}]}"#,
        ],
    );
    let (_, sharegpt) = setup(
        "chat_sys_sharegpt",
        &[
            r#"{"id": 7, "system": "Be brief.", "conversations": [{"from": "human", "value": "Hi, who are you?"}, {"from": "gpt", "value": "A test.", "weight": 1}]}"#,
        ],
    );
    let (_, alpaca) = setup(
        "chat_sys_alpaca",
        &[
            r#"{"source": "s", "system": "Be brief.", "instruction": "Hi, who are you?", "input": "", "output": "A test.", "text": "Instruction: Hi"}"#,
        ],
    );
    // UltraChat's lines: the first question again as "prompt", beside the messages.
    let (_, ultrachat) = setup(
        "chat_sys_ultrachat",
        &[
            r#"{"prompt": "Hi, who are you?", "prompt_id": "a1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A test."}]}"#,
        ],
    );
    let (_, messages_system) = setup(
        "chat_sys_messages_key",
        &[
            r#"{"system": "Be brief.", "messages": [{"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A test."}]}"#,
        ],
    );
    let first = |f: &Path| {
        let (docs, sources) = data::tokenized_documents(f, &tok, &opts).unwrap();
        (docs[0].ids.clone(), docs[0].predict.clone(), sources.unread_keys.into_iter().collect::<Vec<_>>())
    };
    let (ids, predict, unread) = first(&messages);
    assert!(unread.is_empty() && predict.iter().any(|&p| p));
    assert_eq!(first(&sharegpt), (ids.clone(), predict.clone(), vec!["id".to_string()]));
    assert_eq!(first(&messages_system), (ids.clone(), predict.clone(), vec![]));
    assert_eq!(first(&ultrachat), (ids.clone(), predict.clone(), vec!["prompt".to_string(), "prompt_id".to_string()]));
    assert_eq!(first(&alpaca), (ids, predict, vec!["source".to_string(), "text".to_string()]));
    let ds = data::load_with(&sharegpt, &tok, &opts, data::Packing::Packed, 4, 0.0, 0).unwrap();
    assert!(ds.summary.to_string().ends_with("; keys not read: \"id\""), "{}", ds.summary);
}

/// OpenAI's `"weight": 0` makes an assistant turn context only: the same ids, its tokens not
/// targets, the turns before it as in the conversation that ends before it. With
/// `--train-on all`, which trains every token, a weight is refused.
#[test]
fn an_assistant_turn_of_weight_0_is_context_only() {
    let t = fixture("chat/llama3.jinja");
    let opts = ChatOptions { template_file: Some(&t), train_on: TrainOn::Assistant, model: "m", given: &[] };
    let turns = |w: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "First question?"}}, {{"role": "assistant", "content": "First answer."}}, {{"role": "user", "content": "Second?"}}, {{"role": "assistant", "content": "Second answer."{w}}}]}}"#
        )
    };
    let (tok, weighted) = setup("chat_weight0", &[&turns(r#", "weight": 0"#)]);
    let (_, whole) = setup("chat_weight1", &[&turns(r#", "weight": 1"#)]);
    let (_, prefix) = setup(
        "chat_weight_prefix",
        &[
            r#"{"messages": [{"role": "user", "content": "First question?"}, {"role": "assistant", "content": "First answer."}]}"#,
        ],
    );
    let first = |f: &Path| data::tokenized_documents(f, &tok, &opts).unwrap().0.remove(0);
    let (a, d, e) = (first(&weighted), first(&whole), first(&prefix));
    assert_eq!(a.ids, d.ids);
    let n = e.ids.len();
    assert_eq!(a.ids[..n], e.ids[..], "the first turns render as the conversation that ends there");
    assert_eq!(a.predict[..n], e.predict[..]);
    assert!(a.predict[n..].iter().all(|p| !p), "the weight-0 turn has no targets");
    assert!(d.predict[n..].iter().any(|p| *p), "with weight 1 it has");
    assert!(!a.no_assistant);
    let all = ChatOptions { train_on: TrainOn::All, given: &["--train-on"], ..opts };
    let e = data::tokenized_documents(&weighted, &tok, &all).unwrap_err().to_string();
    assert!(e.contains("data.jsonl:1") && e.contains("an assistant turn has \"weight\": 0, but --train-on all"), "{e}");
}

/// Lines of datasets in common use are read, their extra keys named: Cosmopedia's prompt beside
/// its text, SlimOrca's turn weights (0 on human turns), WildChat's per-message metadata, an
/// empty tool list.
#[test]
fn common_dataset_lines_are_read_and_their_extra_keys_named() {
    let t = fixture("chat/llama3.jinja");
    let opts = ChatOptions { template_file: Some(&t), train_on: TrainOn::Assistant, model: "m", given: &[] };
    for (name, line, unread) in [
        (
            "cosmopedia",
            r#"{"prompt": "Write a story.", "text": "Once upon a time.", "audience": "kids"}"#,
            vec!["prompt", "audience"],
        ),
        (
            "slimorca",
            r#"{"conversations": [{"from": "system", "value": "s", "weight": null}, {"from": "human", "value": "q", "weight": 0.0}, {"from": "gpt", "value": "a", "weight": 1.0}]}"#,
            vec![],
        ),
        (
            "wildchat",
            r#"{"conversation_hash": "h", "messages": [{"role": "user", "content": "q", "timestamp": 1, "language": "en"}, {"role": "assistant", "content": "a", "tool_calls": []}]}"#,
            vec!["conversation_hash", "messages[].timestamp", "messages[].language", "messages[].tool_calls"],
        ),
    ] {
        let (tok, file) = setup(&format!("chat_common_{name}"), &[line]);
        let (docs, sources) = data::tokenized_documents(&file, &tok, &opts).unwrap();
        assert!(docs[0].predict.iter().any(|&p| p), "{name}: targets");
        let mut want: Vec<String> = unread.iter().map(|k| k.to_string()).collect();
        want.sort();
        assert_eq!(sources.unread_keys.into_iter().collect::<Vec<_>>(), want, "{name}");
    }
}
