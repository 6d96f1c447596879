//! PEFT's adapter files of every shape PEFT writes (tests/fixtures/gen_peft_shapes.py): target
//! lists with full module names ("all-linear"), a regular expression, rank_pattern and
//! alpha_pattern, layers_to_transform. Each evaluates with portalora as with PEFT; the pattern
//! case also trains step for step as PEFT does and writes its patterns back; and the base model
//! an adapter records is one PEFT can load.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, context, fixture, json, tmp};

/// Runs the CLI; panics with its stderr when it fails.
fn run(args: &[&str]) -> String {
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "portalora {}:\n{}", args.join(" "), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn ids_file(path: &Path, rows: &serde_json::Value) {
    std::fs::write(path, serde_json::json!({ "input_ids": rows }).to_string()).unwrap();
}

/// `eval --json` of `model` with `adapter` on the ids in `ids`.
fn eval(model: &Path, ids: &Path, adapter: Option<&Path>) -> f64 {
    let (m, i) = (model.to_str().unwrap(), ids.to_str().unwrap());
    let mut args = vec!["eval", "--model", m, "--ids", i, "--json"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let out = run(&args);
    serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()["loss"].as_f64().unwrap()
}

fn case(name: &str) -> (PathBuf, serde_json::Value, PathBuf) {
    let dir = fixture(&format!("adapters/peft_{name}"));
    let e = json(&dir.join("expected.json"));
    let model = fixture(if name.starts_with("gpt2") { "tiny_gpt2" } else { "tiny_llama" });
    (dir.join("adapter"), e, model)
}

#[test]
fn peft_adapters_of_every_shape_evaluate_as_in_peft() {
    if context().is_none() {
        return;
    }
    let dir = tmp("shapes");
    for name in ["llama_all_linear", "llama_full_names", "llama_patterns", "llama_layers", "gpt2_regex"] {
        let (adapter, e, model) = case(name);
        let ids = dir.join(format!("{name}.json"));
        ids_file(&ids, &e["eval_ids"]);
        let got = eval(&model, &ids, Some(&adapter));
        let want = e["eval_loss"].as_f64().unwrap();
        assert!((got - want).abs() / want < 1e-5, "{name}: portalora {got} vs PEFT {want}");
        // Every tensor of the file landed in a module of the expected shape (a wrong site set
        // would have been refused by name, and the loss above would differ).
        let file = portalora::adapter::peft::PeftFile::read(&adapter).unwrap();
        for (k, shape) in e["shapes"].as_object().unwrap() {
            let key = format!("base_model.model.{}", k.replace(".default", ""));
            let t = file.tensors.get(&key).unwrap_or_else(|| panic!("{name}: {key} not in the file"));
            let want: Vec<usize> = shape.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, want, "{name}: {key}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rank_and_alpha_patterns_train_like_peft_and_are_written_back() {
    if context().is_none() {
        return;
    }
    let dir = tmp("patterns");
    let (adapter, e, model) = case("llama_patterns");
    let (ids, eval_ids, out) = (dir.join("ids.json"), dir.join("eval.json"), dir.join("out"));
    ids_file(&ids, &e["input_ids"]);
    ids_file(&eval_ids, &e["eval_ids"]);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "train",
        "--model",
        &s(&model),
        "--ids",
        &s(&ids),
        "--init-adapter",
        &s(&adapter),
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--weight-decay",
        "0.01",
        "--max-grad-norm",
        "0",
        "--out",
        &s(&out),
    ];
    run(&args);
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let got: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    let want: Vec<f64> = e["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() / w < 1e-4, "step {}: {g} vs PEFT {w}", i + 1);
    }
    // The patterns are written back in PEFT's order, and the file loads as it was trained.
    let written = json(&out.join("adapter_config.json"));
    assert_eq!(written["rank_pattern"], e["config"]["rank_pattern"]);
    assert_eq!(written["alpha_pattern"], e["config"]["alpha_pattern"]);
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&written["rank_pattern"]), keys(&e["config"]["rank_pattern"]), "pattern order");
    let with_adapter = eval(&model, &eval_ids, Some(&out));
    // Merged into the base, the patterns' per-module scales give the same model.
    let merged = dir.join("merged");
    run(&["merge", "--model", &s(&model), "--adapter", &s(&out), "--out", &s(&merged)]);
    let with_merge = eval(&merged, &eval_ids, None);
    assert!((with_merge - with_adapter).abs() / with_adapter < 1e-5, "merged {with_merge} vs {with_adapter}");
    // A Hugging Face base is recorded by its absolute path, which PEFT loads the base from.
    let base = written["base_model_name_or_path"].as_str().unwrap();
    assert!(Path::new(base).is_absolute() && Path::new(base).join("config.json").exists(), "{base}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn all_linear_as_a_target_adapts_every_projection() {
    let w = portalora::model::load_model(fixture("tiny_llama")).unwrap();
    let cfg = portalora::adapter::AdapterConfig {
        targets: vec!["all-linear".into()],
        ..portalora::adapter::AdapterConfig::new(portalora::adapter::Method::Lora)
    };
    let sites = cfg.sites(&w.config).unwrap();
    assert_eq!(sites.len(), 7 * w.config.num_layers);
    // A full module name of any layer selects exactly that module.
    let cfg = portalora::adapter::AdapterConfig { targets: vec!["model.layers.1.mlp.up_proj".into()], ..cfg };
    let sites = cfg.sites(&w.config).unwrap();
    assert_eq!(sites.iter().map(|s| s.module.as_str()).collect::<Vec<_>>(), ["model.layers.1.mlp.up_proj"]);
}

#[test]
fn a_gguf_base_is_recorded_as_none() {
    // PEFT cannot load a base by a .gguf path, so nothing is recorded rather than a path it
    // would fail on; a folder is recorded absolute.
    assert_eq!(portalora::finetune::base_model_ref(&fixture("tiny.gguf")), None);
    let folder = portalora::finetune::base_model_ref(&fixture("tiny_gpt2")).unwrap();
    assert!(Path::new(&folder).is_absolute() && folder.ends_with("tiny_gpt2"), "{folder}");
}
