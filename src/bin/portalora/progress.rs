//! Progress of a run on the terminal.

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

/// Progress on the terminal: an indicatif bar (redrawn in place, lines printed above it) when
/// stdout is a terminal; otherwise a line every 5% of the run (and for every evaluation and
/// checkpoint), which logs and pipes read well.
pub(crate) struct Progress {
    /// The bar, on a terminal, once the first step has been reported.
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
    val: Option<f64>,
}

impl Progress {
    pub(crate) fn new(tty: bool) -> Self {
        Progress { bar: None, tty, val: None }
    }

    /// A line of its own (above the bar on a terminal).
    pub(crate) fn line(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => outln!("{text}"),
        }
    }

    /// The bar for a run of `steps`, made on the first step it shows.
    fn bar(&mut self, steps: u64) -> &indicatif::ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::with_draw_target(Some(steps), indicatif::ProgressDrawTarget::stdout());
            let style = indicatif::ProgressStyle::with_template("[{bar:24}] {wide_msg}")
                .expect("a fixed template")
                .progress_chars("#>-");
            bar.set_style(style);
            bar
        })
    }

    /// Replaces the bar by its last state as a plain line, so that what follows prints below it.
    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            outln!("{}", bar.message());
        }
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
                    let bar = self.bar(*steps);
                    bar.set_position(stats.step);
                    bar.set_message(text);
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
