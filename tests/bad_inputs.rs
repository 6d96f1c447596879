//! Every bad input of the table in docs/TROUBLESHOOTING.md, fed to the command line as a user
//! would: each must fail with a message naming the file, tensor, field or value (checked by
//! substrings), never panic, and leave no output folder behind. The table is this test's output:
//! it fails when the document's rows differ from the messages it got, and
//! `PORTALORA_WRITE_BAD_INPUTS=1` writes them into the document instead.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixture};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A safetensors file from a header (JSON) and data bytes, the length prefix as given.
fn safetensors(header: &str, data: &[u8], claimed_len: Option<u64>) -> Vec<u8> {
    let mut out = claimed_len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// The byte offset of the first tensor info in a GGUF file (after the header and metadata):
/// found by the first tensor name's length-prefixed bytes.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle in file")
}

struct Case {
    name: &'static str,
    /// Command-line arguments; `DIR` is replaced by this case's folder, `OUT` by an output folder
    /// that must not exist afterwards.
    args: Vec<String>,
    want: Vec<&'static str>,
    /// Environment variables set for the command.
    env: Vec<(&'static str, &'static str)>,
}

fn setup(dir: &Path) {
    setup_chat(dir);
    let llama = fixture("tiny_llama");
    let st = std::fs::read(llama.join("model.safetensors")).unwrap();
    // Truncated safetensors: half the file.
    copy_dir(&llama, &dir.join("truncated"));
    std::fs::write(dir.join("truncated/model.safetensors"), &st[..st.len() / 2]).unwrap();
    // A header whose length prefix points past the end of the file.
    copy_dir(&llama, &dir.join("lying_header"));
    std::fs::write(dir.join("lying_header/model.safetensors"), safetensors("{}", &[], Some(1 << 40))).unwrap();
    // Offsets past the end of the data.
    copy_dir(&llama, &dir.join("past_end"));
    let h = r#"{"model.norm.weight":{"dtype":"F32","shape":[30],"data_offsets":[0,120000]}}"#;
    std::fs::write(dir.join("past_end/model.safetensors"), safetensors(h, &[0u8; 120], None)).unwrap();
    // An unknown dtype.
    copy_dir(&llama, &dir.join("bad_dtype"));
    let h = r#"{"model.norm.weight":{"dtype":"Q9","shape":[30],"data_offsets":[0,120]}}"#;
    std::fs::write(dir.join("bad_dtype/model.safetensors"), safetensors(h, &[0u8; 120], None)).unwrap();
    // An absurd shape.
    copy_dir(&llama, &dir.join("absurd_shape"));
    let h = r#"{"model.norm.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,120]}}"#;
    std::fs::write(dir.join("absurd_shape/model.safetensors"), safetensors(h, &[0u8; 120], None)).unwrap();
    // A config that disagrees with the weights.
    copy_dir(&llama, &dir.join("wrong_config"));
    let cfg = std::fs::read_to_string(llama.join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 30", "\"hidden_size\": 32");
    assert!(cfg.contains("\"hidden_size\": 32"), "fixture config format changed");
    std::fs::write(dir.join("wrong_config/config.json"), cfg).unwrap();
    // GGUF: truncated, a lying tensor count, a tensor past the end, an unknown type, an absurd shape.
    let g = std::fs::read(fixture("tiny.gguf")).unwrap();
    std::fs::write(dir.join("truncated.gguf"), &g[..g.len() * 2 / 3]).unwrap();
    let mut lying = g.clone();
    lying[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()); // tensor count
    std::fs::write(dir.join("lying.gguf"), lying).unwrap();
    // The first tensor info: name (u64 len + bytes), n_dims u32, dims u64 × n, type u32, offset u64.
    let name = b"f32.weight";
    let at = find(&g, name) + name.len();
    let n_dims = u32::from_le_bytes(g[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    let mut past = g.clone();
    past[ty_at + 4..ty_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(dir.join("past_end.gguf"), past).unwrap();
    let mut unknown = g.clone();
    unknown[ty_at..ty_at + 4].copy_from_slice(&20u32.to_le_bytes()); // IQ4_NL
    std::fs::write(dir.join("unknown_type.gguf"), unknown).unwrap();
    let mut absurd = g.clone();
    absurd[at + 4..at + 12].copy_from_slice(&(1u64 << 62).to_le_bytes());
    std::fs::write(dir.join("absurd.gguf"), absurd).unwrap();
    // Data.
    std::fs::write(dir.join("empty.txt"), "").unwrap();
    std::fs::write(dir.join("latin1.txt"), b"caf\xe9 au lait\n".repeat(10)).unwrap();
    std::fs::write(dir.join("missing.jsonl"), "{\"text\": \"fine\"}\n{\"prompt\": \"no completion\"}\n").unwrap();
    std::fs::write(dir.join("ids_vocab.json"), "{\"input_ids\": [[1, 2, 3, 99999]]}").unwrap();
    std::fs::write(dir.join("ids_labels.json"), "{\"input_ids\": [[1, 2, 3, 4]], \"labels\": [[-100, 2, 3, 4]]}")
        .unwrap();
    std::fs::write(dir.join("ids_ok.json"), "{\"input_ids\": [[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]]}")
        .unwrap();
    std::fs::write(dir.join("text.txt"), "To be, or not to be, that is the question.\n".repeat(50)).unwrap();
    // An adapter whose tensor shapes do not fit (rank 4 A with the wrong input width).
    let adir = dir.join("bad_adapter");
    copy_dir(&fixture("adapters/llama_lora/init"), &adir);
    let cfg = std::fs::read_to_string(adir.join("adapter_config.json")).unwrap();
    let st = std::fs::read(adir.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    let mut renamed = serde_json::Map::new();
    for (k, v) in header.as_object().unwrap() {
        renamed.insert(k.replace("layers.0", "layers.7"), v.clone());
    }
    let h = serde_json::to_string(&renamed).unwrap();
    std::fs::write(adir.join("adapter_model.safetensors"), safetensors(&h, &st[8 + n..], None)).unwrap();
    std::fs::write(adir.join("adapter_config.json"), cfg).unwrap();
    // Config files: a misspelled switch set to false, a value given as a boolean.
    std::fs::write(dir.join("misspelled.toml"), "no_shufle = false\n").unwrap();
    std::fs::write(dir.join("bool_value.toml"), "lr = false\n").unwrap();
    std::fs::write(dir.join("nested.toml"), "config = \"other.toml\"\n").unwrap();
    // A GGUF without its tokenizer's merges (renamed, same length).
    let mut g = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf/tiny_model.gguf")).unwrap();
    let at = find(&g, b"tokenizer.ggml.merges");
    g[at..at + 21].copy_from_slice(b"tokenizer.ggml.mergex");
    std::fs::write(dir.join("no_tokenizer.gguf"), g).unwrap();
    setup_semantics(dir);
}

/// A copy of the tiny LLaMA folder with `edit` applied to its config.json.
fn llama_with_config(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let to = dir.join(name);
    copy_dir(&fixture("tiny_llama"), &to);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(to.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(to.join("config.json"), cfg.to_string()).unwrap();
}

/// A copy of a PEFT adapter folder with `edit` applied to its adapter_config.json.
fn adapter_with_config(dir: &Path, from: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let to = dir.join(name);
    copy_dir(&fixture(from), &to);
    let path = to.join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(path, cfg.to_string()).unwrap();
}

/// Inputs that would once have been read silently wrong, and a finished run to resume.
fn setup_semantics(dir: &Path) {
    // A q bias in a LLaMA checkpoint whose config has no attention_bias: one more tensor.
    copy_dir(&fixture("tiny_llama"), &dir.join("biased"));
    let st = std::fs::read(dir.join("biased/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&st[8..8 + n]).unwrap();
    let end = st.len() - 8 - n;
    header.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        serde_json::json!({"dtype": "F32", "shape": [30], "data_offsets": [end, end + 120]}),
    );
    let mut data = st[8 + n..].to_vec();
    data.extend(0.5f32.to_le_bytes().repeat(30));
    let h = serde_json::to_string(&header).unwrap();
    std::fs::write(dir.join("biased/model.safetensors"), safetensors(&h, &data, None)).unwrap();
    llama_with_config(dir, "yarn_rope", |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 8.0});
    });

    llama_with_config(dir, "gelu_llama", |c| c["hidden_act"] = "gelu".into());
    llama_with_config(dir, "tied_but_not", |c| c["tie_word_embeddings"] = true.into());
    // A GGUF with a tensor portalora does not know (a renamed tensor of the same length).
    let mut g = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf/tiny_model.gguf")).unwrap();
    let at = find(&g, b"token_embd.weight");
    g[at..at + 17].copy_from_slice(b"altup_proj.weight");
    std::fs::write(dir.join("unknown_tensor.gguf"), g).unwrap();
    // PEFT options portalora does not implement, and one it does not know; a DoRA config on
    // LoRA's tensors.
    let lora = "adapters/llama_lora/init";
    adapter_with_config(dir, lora, "dora", |c| c["use_dora"] = true.into());
    adapter_with_config(dir, lora, "modules_to_save", |c| c["modules_to_save"] = serde_json::json!(["lm_head"]));
    adapter_with_config(dir, lora, "unknown_option", |c| c["wavelet_config"] = serde_json::json!({"levels": 2}));
    adapter_with_config(dir, lora, "pissa", |c| c["init_lora_weights"] = serde_json::json!("pissa_niter_4"));
    // Data in a .json file, and prompt/completion JSONL for eval.
    std::fs::write(dir.join("array.json"), r#"[{"text": "To be"}, {"text": "or not"}]"#).unwrap();
    // A finished run (2 steps, a checkpoint at the last) to resume.
    let st = bin()
        .args(["train", "--model", &fixture("tiny_gpt2").to_string_lossy(), "--targets", "c_attn", "--steps", "2"])
        .args(["--batch", "2", "--seq", "8", "--data", &dir.join("text.txt").to_string_lossy(), "--out"])
        .arg(dir.join("done"))
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    setup_export(dir);
}

/// What `export` refuses (issue 18): a Delta-LoRA run's adapter (its run.json says so; eval and
/// train refuse it too), a file that exists, an adapter file that is not GGUF.
fn setup_export(dir: &Path) {
    let delta = dir.join("delta_run/adapter");
    std::fs::create_dir_all(&delta).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir.join("done").join(f), delta.join(f)).unwrap();
    }
    std::fs::write(dir.join("delta_run/run.json"), r#"{"adapter": {"method": "delta-lora"}}"#).unwrap();
    std::fs::write(dir.join("exists.gguf"), "an earlier export").unwrap();
    std::fs::write(dir.join("not_gguf.gguf"), "not a GGUF file").unwrap();
}

/// `portalora export`'s refusals.
fn export_cases(gpt2: &str) -> Vec<Case> {
    let c = |name: &'static str, args: Vec<String>, want: &[&'static str]| Case {
        name,
        args,
        want: want.to_vec(),
        env: vec![],
    };
    let export = |rest: &str| -> Vec<String> {
        format!("export --model {gpt2} {rest}").split(' ').map(str::to_string).collect()
    };
    vec![
        c(
            "a Delta-LoRA adapter exported as a LoRA file",
            export("--adapter DIR/delta_run/adapter --out OUT --as lora"),
            &["Delta-LoRA adapter", "moved the base weights", "--as merged"],
        ),
        c(
            "a Delta-LoRA run's adapter applied to a base",
            format!("eval --model {gpt2} --adapter DIR/delta_run/adapter --data DIR/text.txt --seq 8")
                .split(' ')
                .map(str::to_string)
                .collect(),
            &["delta_run/adapter", "Delta-LoRA run's adapter", "as --model", "--resume"],
        ),
        c(
            "a Delta-LoRA run's adapter as --init-adapter",
            format!(
                "train --model {gpt2} --init-adapter DIR/delta_run/adapter --data DIR/text.txt --out OUT --steps 1"
            )
            .split(' ')
            .map(str::to_string)
            .collect(),
            &["delta_run/adapter", "Delta-LoRA run's adapter"],
        ),
        c(
            "a quantized type for a LoRA file",
            export("--adapter DIR/done --out OUT --type q4_k"),
            &["--type q4_k", "f32 or f16"],
        ),
        c(
            "an export over a file that exists",
            export("--adapter DIR/done --out DIR/exists.gguf"),
            &["exists.gguf exists", "--overwrite"],
        ),
        c(
            "a merged export from a folder whose tokenizer llama.cpp cannot name",
            export("--adapter DIR/done --out OUT --as merged"),
            &["pre-tokenizer null", "convert_hf_to_gguf.py"],
        ),
        c(
            "an adapter file that is not GGUF",
            export("--adapter DIR/not_gguf.gguf --out OUT"),
            &["not_gguf.gguf", "not a GGUF LoRA adapter"],
        ),
        c(
            "an unknown tensor type",
            export("--adapter DIR/done --out OUT --type q7"),
            &["--type \"q7\"", "not a ggml type"],
        ),
    ]
}

/// Chat data and templates that are refused (issue 17).
fn setup_chat(dir: &Path) {
    let user = r#"{"role": "user", "content": "hi"}"#;
    let files = [
        ("chat.jsonl", format!(r#"{{"messages": [{user}]}}"#)),
        ("chat_role.jsonl", r#"{"messages": [{"role": "tool", "content": "42"}]}"#.to_string()),
        (
            "chat_content.jsonl",
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#.into(),
        ),
        ("chat_mixed.jsonl", format!("{{\"messages\": [{user}]}}\n{{\"text\": \"hi\"}}")),
        ("raises.jinja", "{{ raise_exception('System role not supported') }}".into()),
        ("broken.jinja", "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}".into()),
        ("chatml.jinja", "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}".into()),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn chat_cases(t: &dyn Fn(&str, &[&str]) -> Vec<String>, gpt2: &str) -> Vec<Case> {
    let c = |name: &'static str, args: Vec<String>, want: &[&'static str]| Case {
        name,
        args,
        want: want.to_vec(),
        env: vec![],
    };
    let tmpl = ["--chat-template", "DIR/chatml.jinja"];
    vec![
        c(
            "chat data, model without a chat template",
            t(gpt2, &["--data", "DIR/chat.jsonl"]),
            &["no chat template", "--chat-template"],
        ),
        c(
            "chat message with an unknown role",
            t(gpt2, &["--data", "DIR/chat_role.jsonl", tmpl[0], tmpl[1]]),
            &["chat_role.jsonl:1", "\"tool\""],
        ),
        c(
            "chat content that is not a string",
            t(gpt2, &["--data", "DIR/chat_content.jsonl", tmpl[0], tmpl[1]]),
            &["chat_content.jsonl:1", "a list"],
        ),
        c(
            "JSONL lines of different formats",
            t(gpt2, &["--data", "DIR/chat_mixed.jsonl", tmpl[0], tmpl[1]]),
            &["chat_mixed.jsonl:2", "line 1 is messages"],
        ),
        c(
            "chat template that raises",
            t(gpt2, &["--data", "DIR/chat.jsonl", "--chat-template", "DIR/raises.jinja"]),
            &["chat.jsonl:1", "System role not supported"],
        ),
        c(
            "chat template that does not parse",
            t(gpt2, &["--data", "DIR/chat.jsonl", "--chat-template", "DIR/broken.jinja"]),
            &["broken.jinja", "line 2", "column"],
        ),
        c("--train-on without conversations", t(gpt2, &["--train-on", "all"]), &["--train-on would be ignored"]),
    ]
}

fn cases() -> Vec<Case> {
    let llama = fixture("tiny_llama").to_str().unwrap().to_string();
    let t = |model: &str, rest: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["train", "--model", model, "--out", "OUT", "--steps", "1"].iter().map(|s| s.to_string()).collect();
        if !rest.contains(&"--ids") {
            v.extend(["--batch", "2", "--seq", "8"].iter().map(|s| s.to_string()));
        }
        if !rest.contains(&"--data") && !rest.contains(&"--ids") {
            v.extend(["--data".to_string(), "DIR/text.txt".to_string()]);
        }
        if !rest.contains(&"--targets") && !rest.contains(&"--init-adapter") {
            v.extend(["--targets".to_string(), if model.contains("gpt2") { "c_attn" } else { "q_proj" }.to_string()]);
        }
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let tiny_gpt2 = fixture("tiny_gpt2").to_str().unwrap().to_string();
    let c = |name: &'static str, args: Vec<String>, want: &[&'static str]| Case {
        name,
        args,
        want: want.to_vec(),
        env: vec![],
    };
    vec![
        c("truncated safetensors", t("DIR/truncated", &[]), &["DIR/truncated/model.safetensors"]),
        c("safetensors header longer than the file", t("DIR/lying_header", &[]), &["lying_header/model.safetensors"]),
        c("safetensors offsets past the end", t("DIR/past_end", &[]), &["past_end/model.safetensors"]),
        c("safetensors unknown dtype", t("DIR/bad_dtype", &[]), &["bad_dtype/model.safetensors", "Q9"]),
        c("safetensors absurd shape", t("DIR/absurd_shape", &[]), &["absurd_shape/model.safetensors"]),
        c(
            "config that disagrees with the weights",
            t("DIR/wrong_config", &[]),
            &["wrong_config", "model.embed_tokens.weight", "config"],
        ),
        c("truncated GGUF", t("DIR/truncated.gguf", &[]), &["truncated.gguf"]),
        c("GGUF tensor count that lies", t("DIR/lying.gguf", &[]), &["lying.gguf"]),
        c("GGUF tensor past the end", t("DIR/past_end.gguf", &[]), &["past_end.gguf", "f32.weight"]),
        c(
            "GGUF tensor type portalora does not read",
            t("DIR/unknown_type.gguf", &[]),
            &["unknown_type.gguf", "an IQ type", "Q4_K_M"],
        ),
        c("GGUF absurd shape", t("DIR/absurd.gguf", &[]), &["absurd.gguf", "f32.weight"]),
        c(
            "adapter whose tensors do not fit the model",
            t(&llama, &["--init-adapter", "DIR/bad_adapter", "--ids", "DIR/ids_ok.json"]),
            &["bad_adapter does not fit the base model", "tiny_llama", "layers.7"],
        ),
        c(
            "adapter for another architecture",
            t(&tiny_gpt2, &["--init-adapter", &fixture("adapters/llama_lora/init").to_string_lossy()]),
            &["adapters/llama_lora/init does not fit the base model", "tiny_gpt2", "unknown target module", "Gpt2"],
        ),
        c("unknown target module", t(&tiny_gpt2, &["--targets", "qkv_proj"]), &["qkv_proj", "valid targets: c_attn"]),
        c("empty data file", t(&tiny_gpt2, &["--data", "DIR/empty.txt"]), &["empty.txt"]),
        c("data that is not UTF-8", t(&tiny_gpt2, &["--data", "DIR/latin1.txt"]), &["latin1.txt", "UTF-8"]),
        c("JSONL line without the fields", t(&tiny_gpt2, &["--data", "DIR/missing.jsonl"]), &["missing.jsonl", "2"]),
        c(
            "token id outside the vocabulary",
            t(&llama, &["--ids", "DIR/ids_vocab.json"]),
            &["ids_vocab.json", "99999", "vocabulary of 61"],
        ),
        c("sequence longer than the context", t(&tiny_gpt2, &["--seq", "100000"]), &["--seq 100000", "context of 40"]),
        c("rank 0", t(&tiny_gpt2, &["--rank", "0"]), &["rank 0"]),
        c("rank above min(in, out)", t(&tiny_gpt2, &["--rank", "25"]), &["rank 25", "c_attn"]),
        c("negative learning rate", t(&tiny_gpt2, &["--lr=-0.1"]), &["-0.1"]),
        c("NaN learning rate", t(&tiny_gpt2, &["--lr", "nan"]), &["--lr", "not a finite number"]),
        c("NaN weight decay", t(&tiny_gpt2, &["--weight-decay", "nan"]), &["--weight-decay", "not a finite number"]),
        c("dropout outside [0, 1)", t(&tiny_gpt2, &["--dropout", "1.5"]), &["dropout 1.5"]),
        c(
            "batch too large for the device",
            vec![
                "bench".into(),
                "step".into(),
                "--model".into(),
                tiny_gpt2.clone(),
                "--batch".into(),
                "4000000".into(),
                "--seq".into(),
                "32".into(),
            ],
            &["\"up\"", "49152000000 bytes", "smaller batch"],
        ),
        c("unknown base dtype", t(&tiny_gpt2, &["--base-dtype", "iq4_xs"]), &["iq4_xs", "q4_k"]),
        c("missing model", t("DIR/nothing-here", &[]), &["--model DIR/nothing-here: no such file or folder"]),
    ]
    .into_iter()
    .chain(semantic_cases(&t, &llama, &tiny_gpt2))
    .chain(chat_cases(&t, &tiny_gpt2))
    .chain(export_cases(&tiny_gpt2))
    .collect()
}

/// Inputs that were once run silently wrong or that clobbered work.
fn semantic_cases(t: &dyn Fn(&str, &[&str]) -> Vec<String>, llama: &str, gpt2: &str) -> Vec<Case> {
    let c = |name: &'static str, args: Vec<String>, want: &[&'static str]| Case {
        name,
        args,
        want: want.to_vec(),
        env: vec![],
    };
    let words = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<String>>();
    let eval_ids =
        |model: &str, adapter: &str| words(&format!("eval --model {model} --ids DIR/ids_ok.json --adapter {adapter}"));
    let resume = |rest: &str| words(&format!("train --resume DIR/done {rest}"));
    vec![
        c(
            "a tensor the model does not use (a q bias without attention_bias)",
            t("DIR/biased", &[]),
            &["model.layers.0.self_attn.q_proj.bias", "not part of"],
        ),
        c(
            "GGUF tensor the model does not use",
            t("DIR/unknown_tensor.gguf", &[]),
            &["altup_proj.weight", "not part of"],
        ),
        c("rope scaling portalora does not implement", t("DIR/yarn_rope", &[]), &["\"yarn\"", "not supported"]),
        c("an activation the architecture does not have", t("DIR/gelu_llama", &[]), &["hidden_act", "gelu"]),
        c(
            "tied head that differs from the embedding",
            t("DIR/tied_but_not", &[]),
            &["tie_word_embeddings", "lm_head.weight"],
        ),
        c("--steps with --epochs", t(gpt2, &["--epochs", "1"]), &["--steps", "--epochs", "not both"]),
        c("--batch 0", t(gpt2, &["--batch", "0"]), &["--batch 0"]),
        c(
            "--val-rows without validation rows",
            t(gpt2, &["--val-fraction", "0", "--val-rows", "4"]),
            &["--val-rows 4", "no validation rows"],
        ),
        c("warm-up beyond the run", t(gpt2, &["--warmup-steps", "5"]), &["--warmup-steps 5", "beyond the run"]),
        c(
            "Delta-LoRA warm-up beyond the run",
            t(gpt2, &["--method", "delta-lora"]),
            &["--delta-warmup 500", "never move"],
        ),
        c(
            "Delta-LoRA with dropout",
            t(gpt2, &["--method", "delta-lora", "--delta-warmup", "0", "--dropout", "0.3"]),
            &["dropout 0.3", "Delta-LoRA has no dropout"],
        ),
        c(
            "flags the method or optimizer does not use",
            t(gpt2, &["--method", "vera", "--alpha", "16", "--momentum", "0.5"]),
            &["--alpha: VeRA has no alpha", "--momentum: only SGD"],
        ),
        c(
            "an --ids file with labels",
            t(llama, &["--ids", "DIR/ids_labels.json"]),
            &["ids_labels.json", "\"labels\"", "does not read"],
        ),
        c("--batch with --ids", t(llama, &["--ids", "DIR/ids_ok.json", "--batch", "4"]), &["--batch: with --ids"]),
        c(
            "missing options, all at once",
            words(&format!("train --model {gpt2}")),
            &["--data FILE", "--steps N", "--targets LIST", "offers c_attn, c_proj, c_fc", "--out DIR"],
        ),
        c("data in a .json array", t(gpt2, &["--data", "DIR/array.json"]), &["array.json", "JSON array", "jq -c"]),
        c(
            "--out that holds an earlier run",
            words(&format!("train --model {gpt2} --data DIR/text.txt --targets c_attn --steps 1 --out DIR/done")),
            &["done is not empty", "--resume", "--overwrite"],
        ),
        c(
            "--out that is an input",
            words(&format!(
                "train --model {gpt2} --data DIR/text.txt --targets c_attn --steps 1 --out DIR --overwrite"
            )),
            &["would overwrite the input"],
        ),
        c(
            "merge into the base model's folder (`merge`)",
            words("merge --model DIR/truncated --adapter DIR/done --out DIR/truncated"),
            &["would overwrite the input"],
        ),
        c(
            "missing data",
            t(gpt2, &["--data", "DIR/nothing-here.txt"]),
            &["--data DIR/nothing-here.txt: no such file or folder"],
        ),
        c(
            "missing adapter (`eval`)",
            words(&format!("eval --model {gpt2} --ids DIR/ids_ok.json --adapter DIR/nothing-here")),
            &["--adapter DIR/nothing-here: no such file or folder"],
        ),
        c(
            "`eval` with --seq beyond the context",
            words(&format!("eval --model {gpt2} --data DIR/text.txt --seq 100000")),
            &["--seq 100000", "context of 40", "use --seq 40 or less"],
        ),
        c(
            "a GGUF without a tokenizer",
            t("DIR/no_tokenizer.gguf", &[]),
            &["no_tokenizer.gguf holds no tokenizer", "tokenizer.ggml.merges is missing", "--ids"],
        ),
        c(
            "a GGUF without a tokenizer (`eval`)",
            words("eval --model DIR/no_tokenizer.gguf --data DIR/text.txt --seq 8"),
            &["no_tokenizer.gguf holds no tokenizer", "tokenizer.ggml.merges is missing", "--ids"],
        ),
        c(
            "--out that is a file, with --overwrite",
            words(&format!(
                "train --model {gpt2} --data DIR/text.txt --targets c_attn --steps 1 --out DIR/exists.gguf --overwrite"
            )),
            &["exists.gguf is a file", "never replaced"],
        ),
        c(
            "--out where nothing can be written (under a file)",
            t(gpt2, &["--out", "DIR/exists.gguf/run"]),
            &["DIR/exists.gguf/run: cannot write in DIR/exists.gguf", "pick an output folder you can write to"],
        ),
        c(
            "--eval-every without validation rows",
            t(gpt2, &["--val-fraction", "0", "--eval-every", "1"]),
            &["--eval-every 1", "--val-fraction 0 holds none out"],
        ),
        c(
            "--resume with a setting it cannot change",
            resume("--batch 8 --rank 4"),
            &["--batch, --rank cannot change when resuming", "--init-adapter"],
        ),
        c(
            "--resume with a target behind the checkpoint",
            resume("--steps 1"),
            &["--steps 1 is behind the checkpoint of step 2"],
        ),
        c(
            "--init with --init-adapter",
            t(llama, &["--ids", "DIR/ids_ok.json", "--init-adapter", "DIR/bad_adapter", "--init", "gaussian"]),
            &["--init: the adapter starts from --init-adapter's tensors"],
        ),
        c(
            "`generate` sampling flags without a temperature",
            words(&format!("generate --model {gpt2} --prompt To --top-k 5 --seed 3")),
            &["--top-k, --seed are not used with --temperature 0"],
        ),
        c(
            "`eval --ids` with --seq",
            words(&format!("eval --model {gpt2} --ids DIR/ids_ok.json --seq 8")),
            &["--seq is not used with --ids"],
        ),
        c(
            "PEFT adapter with use_dora but no magnitude vectors",
            eval_ids(llama, "DIR/dora"),
            &["lora_magnitude_vector", "is missing"],
        ),
        c(
            "a DoRA adapter given to --method lora",
            t(
                llama,
                &["--ids", "DIR/ids_ok.json", "--init-adapter", &fixture("adapters/llama_dora/init").to_string_lossy()],
            ),
            &["holds a DoRA adapter", "use method dora"],
        ),
        c("PEFT adapter with modules_to_save", eval_ids(llama, "DIR/modules_to_save"), &["modules_to_save", "lm_head"]),
        c(
            "PEFT adapter initialised by PiSSA, not converted",
            eval_ids(llama, "DIR/pissa"),
            &["pissa_niter_4", "path_initial_model_for_weight_conversion"],
        ),
        c(
            "PEFT adapter with an option portalora does not know",
            eval_ids(llama, "DIR/unknown_option"),
            &["wavelet_config", "does not know"],
        ),
        c(
            "a config file key that is no flag",
            t(gpt2, &["--config", "DIR/misspelled.toml"]),
            &["misspelled.toml", "no_shufle is not a setting of train"],
        ),
        c(
            "a config file naming another",
            t(gpt2, &["--config", "DIR/nested.toml"]),
            &["nested.toml", "does not name another"],
        ),
        c(
            "a config file value given as true or false",
            t(gpt2, &["--config", "DIR/bool_value.toml"]),
            &["bool_value.toml", "lr = false", "takes a value"],
        ),
        Case {
            name: "an unknown PORTALORA_COOP",
            args: t(llama, &[]),
            want: vec!["PORTALORA_COOP=\"maybe\"", "auto, on or off"],
            env: vec![("PORTALORA_COOP", "maybe")],
        },
        Case {
            name: "a PORTALORA_MATMUL_TILE the kernel cannot take",
            args: t(llama, &[]),
            want: vec!["PORTALORA_MATMUL_TILE=\"30x1\"", "multiple of 4"],
            env: vec![("PORTALORA_MATMUL_TILE", "30x1")],
        },
        Case {
            name: "an unknown PORTALORA_ATTENTION",
            args: t(llama, &[]),
            want: vec!["PORTALORA_ATTENTION=\"flash\"", "fused or auto"],
            env: vec![("PORTALORA_ATTENTION", "flash")],
        },
    ]
}

#[test]
fn every_bad_input_gets_a_clear_message_and_leaves_nothing() {
    if common::context().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("portalora-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    setup(&dir);
    let mut rows = vec!["| bad input | message |".to_string(), "|---|---|".to_string()];
    let mut failures = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        let out: PathBuf = dir.join(format!("out{i}"));
        let d = dir.to_str().unwrap();
        let args: Vec<String> =
            c.args.iter().map(|a| a.replace("DIR", d).replace("OUT", out.to_str().unwrap())).collect();
        let o = bin().args(&args).envs(c.env.iter().copied()).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).replace(d, "DIR");
        rows.push(table_row(&c, &stderr));
        let mut problems = Vec::new();
        if o.status.success() {
            problems.push("succeeded".to_string());
        }
        if stderr.contains("panicked") {
            problems.push("panicked".to_string());
        }
        for w in &c.want {
            if !stderr.contains(w) {
                problems.push(format!("no {w:?}"));
            }
        }
        if out.exists() {
            problems.push("left an output folder".to_string());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {} — stderr:\n{stderr}", c.name, problems.join(", ")));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(failures.is_empty(), "{} bad inputs mishandled:\n{}", failures.len(), failures.join("\n"));
    check_table(&rows);
}

/// A case's row of the table: its name (with the command where it is not `train`) and the
/// message as a user in the repository's root reads it, without what differs between machines:
/// the lines before `error:` (the adapter `bench` reports) and a device's limits.
fn table_row(c: &Case, stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"))
        .collect();
    let first = lines.iter().position(|l| l.starts_with("error:")).unwrap_or(0);
    let msg = lines[first..].join(" ").replace(concat!(env!("CARGO_MANIFEST_DIR"), "/"), "");
    let msg = regex::Regex::new(r"this device's \d+-byte").unwrap().replace_all(&msg, "this device's N-byte");
    let msg = msg.replace('|', "\\|");
    // A message holding backticks goes in a double-backtick span.
    let code = if msg.contains('`') { format!("`` {msg} ``") } else { format!("`{msg}`") };
    let command = match c.args.first().map(String::as_str) {
        Some("train") | None => String::new(),
        Some(cmd) if c.name.contains(&format!("`{cmd}")) => String::new(),
        Some("bench") => format!("`bench {}`: ", c.args.get(1).map(String::as_str).unwrap_or("")),
        Some(other) => format!("`{other}`: "),
    };
    format!("| {command}{} | {code} |", c.name)
}

/// The table between docs/TROUBLESHOOTING.md's markers equals `rows` (or is rewritten to them
/// with `PORTALORA_WRITE_BAD_INPUTS=1`).
fn check_table(rows: &[String]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/TROUBLESHOOTING.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let begin = doc.find("<!-- bad-inputs:begin").expect("the begin marker");
    let begin = begin + doc[begin..].find('\n').expect("a line after the marker") + 1;
    let end = begin + doc[begin..].find("<!-- bad-inputs:end -->").expect("the end marker");
    let table = rows.join("\n") + "\n";
    if doc[begin..end] == table {
        return;
    }
    if std::env::var("PORTALORA_WRITE_BAD_INPUTS").is_ok_and(|v| v == "1") {
        let updated = format!("{}{table}{}", &doc[..begin], &doc[end..]);
        let tmp = path.with_extension("md.tmp");
        std::fs::write(&tmp, updated).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eprintln!("wrote {} rows into {}", rows.len() - 2, path.display());
        return;
    }
    let old: Vec<&str> = doc[begin..end].lines().collect();
    let first = rows.iter().zip(&old).position(|(a, b)| a != b).unwrap_or(rows.len().min(old.len()));
    panic!(
        "{}'s bad-input table differs from the messages (first at row {first}: {:?} vs {:?}); \
         regenerate it with PORTALORA_WRITE_BAD_INPUTS=1 cargo test --release --test bad_inputs",
        path.display(),
        rows.get(first),
        old.get(first)
    );
}
