//! Where a training step's time goes: every dispatch of the recorded step run and timed on its
//! own, summed by kernel and shape. `cargo run --release --example profile_step -- MODEL [B T]`
use std::collections::BTreeMap;

use portalora::adapter::{AdapterConfig, Method};
use portalora::train::{TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).ok_or("usage: profile_step MODEL [BATCH SEQ]")?;
    let b: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let t: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let ctx = pollster::block_on(portalora::gpu::Context::new())?;
    let w = portalora::model::load_model(model)?;
    let mut cfg = AdapterConfig::new(Method::Lora);
    cfg.targets =
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec();
    let trainer = Trainer::new(&ctx, &w, b, t, &cfg, &TrainConfig::default(), None)?;
    let ids: Vec<Vec<u32>> =
        (0..b).map(|r| (0..t).map(|i| ((r * 7919 + i * 104729) % 1000) as u32).collect()).collect();
    trainer.model.write_inputs(&ctx, &ids)?;
    let times = ctx.profile(trainer.model.train_step().ok_or("no train step")?)?;
    let total: f64 = times.iter().map(|x| x.1).sum();
    let mut by: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (label, s) in &times {
        let e = by.entry(label.clone()).or_default();
        e.0 += s;
        e.1 += 1;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!("{} dispatches, {total:.3} s in all", times.len());
    for (label, (s, n)) in v.iter().take(25) {
        println!("{:>8.3} s {:>5.1}% {n:>5}×  {label}", s, 100.0 * s / total);
    }
    Ok(())
}
