//! Progress of a run on the terminal.

use std::io::Write;

use portalora::finetune::Event;

pub(crate) fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

pub(crate) fn clock(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Progress on the terminal: a bar redrawn in place when stdout is a terminal; otherwise a line
/// every 5% of the run (and for every evaluation and checkpoint).
pub(crate) struct Progress {
    pub(crate) tty: bool,
    pub(crate) val: Option<f64>,
    pub(crate) bar_open: bool,
}

impl Progress {
    pub(crate) fn line(&mut self, text: &str) {
        if self.bar_open {
            println!();
            self.bar_open = false;
        }
        println!("{text}");
    }

    pub(crate) fn event(&mut self, e: &Event) {
        match e {
            Event::LeftOut(l) => self.line(&format!("note: {l}")),
            Event::Note(n) => self.line(&format!("note: {n}")),
            Event::Data(s) => self.line(&format!("data: {s}")),
            Event::Started { trainable, kept_bytes, model_kept_bytes, steps, first_step } => {
                self.line(&format!(
                    "trainable parameters {trainable}, kept for backward {} (model {} + adapter {}), steps {first_step}..={steps}",
                    mib(*kept_bytes),
                    mib(*model_kept_bytes),
                    mib(kept_bytes - model_kept_bytes)
                ));
            }
            Event::Samples { after, samples } => {
                let when = if *after { "after training" } else { "before training (the base model)" };
                self.line(&format!("samples {when}:"));
                for (p, t) in samples.iter() {
                    self.line(&format!("  {}▌{}", p.replace('\n', "\n  "), t.replace('\n', "\n  ")));
                }
            }
            Event::Step { stats, steps, eta_s, tokens_per_s, .. } => {
                let val = self.val.map(|v| format!("  val {v:.4}")).unwrap_or_default();
                let text = format!(
                    "step {}/{steps}  loss {:.4}{val}  lr {:.2e}  {:.0} tok/s  ETA {}",
                    stats.step,
                    stats.loss,
                    stats.lr,
                    tokens_per_s,
                    clock(*eta_s)
                );
                if self.tty {
                    let width = 24;
                    let done = (stats.step as usize * width / (*steps).max(1) as usize).min(width);
                    print!("\r[{}{}] {text}\x1b[K", "#".repeat(done), "-".repeat(width - done));
                    let _ = std::io::stdout().flush();
                    self.bar_open = true;
                } else if stats.step == *steps || stats.step % (steps / 20).max(1) == 0 {
                    self.line(&text);
                }
            }
            Event::Eval { step, val_loss } => {
                self.val = Some(*val_loss);
                if !self.tty || *step == 0 {
                    self.line(&format!("step {step}: validation loss {val_loss:.4}"));
                }
            }
            Event::Checkpoint { step, dir } => {
                if !self.tty {
                    self.line(&format!("step {step}: checkpoint in {}", dir.display()));
                }
            }
        }
    }
}
