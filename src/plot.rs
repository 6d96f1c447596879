//! The loss curve as an SVG image (train loss per step, validation loss at each evaluation).
//! Written by hand: a polyline and some text need no plotting crate.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Round tick steps (1, 2, 5 × 10^k) giving about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// An SVG document plotting `train` and `val` as (step, loss) points under `title`.
pub fn loss_svg(train: &[(u64, f64)], val: &[(u64, f64)], title: &str) -> String {
    let f = Frame::fit(train, val);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>
"#,
        W / 2.0,
        escape(title)
    );
    f.axes(&mut s);
    // The raw per-step loss is noisy (each step sees other rows): drawn faint, with a trailing
    // mean over about a twentieth of the run on top.
    f.polyline(&mut s, train, r##"stroke="#1f77b4" stroke-opacity="0.3" stroke-width="1""##);
    f.polyline(&mut s, &trailing_mean(train), r##"stroke="#1f77b4" stroke-width="1.6""##);
    f.polyline(&mut s, val, r##"stroke="#ff7f0e" stroke-width="1.6""##);
    for &(x, y) in val.iter().filter(finite) {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#ff7f0e"/>"##, f.px(x as f64), f.py(y));
    }
    legend(&mut s);
    s
}

/// Whether a (step, loss) point has a finite loss and so is drawn.
fn finite(p: &&(u64, f64)) -> bool {
    p.1.is_finite()
}

/// The data ranges shown, (x0, x1) steps and (y0, y1) losses, and their mapping to the plot area.
struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    /// Ranges covering every finite point of `train` and `val`, the losses padded by 8%.
    fn fit(train: &[(u64, f64)], val: &[(u64, f64)]) -> Frame {
        let all: Vec<(u64, f64)> = train.iter().chain(val).filter(finite).copied().collect();
        let (x0, x1) = (
            all.iter().map(|p| p.0).min().unwrap_or(0) as f64,
            all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64,
        );
        let x1 = if x1 <= x0 { x0 + 1.0 } else { x1 };
        let (lo, hi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (lo, hi) = if all.is_empty() { (0.0, 1.0) } else { (lo, hi) };
        let pad = ((hi - lo) * 0.08).max(1e-3);
        Frame { x0, x1, y0: lo - pad, y1: hi + pad }
    }

    /// The SVG x coordinate of step `x`.
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)
    }

    /// The SVG y coordinate of loss `y`.
    fn py(&self, y: f64) -> f64 {
        TOP + (self.y1 - y) / (self.y1 - self.y0) * (H - TOP - BOTTOM)
    }

    /// Writes the grid, both axes' ticks, the plot border and the axis titles.
    fn axes(&self, s: &mut String) {
        let (x0, x1, y0, y1) = (self.x0, self.x1, self.y0, self.y1);
        let ys = tick_step(y1 - y0, 6.0);
        let mut y = (y0 / ys).ceil() * ys;
        while y <= y1 {
            let yy = self.py(y);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e4e4e4"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
                x2 = W - RIGHT,
                tx = LEFT - 6.0,
                ty = yy + 4.0,
                label = format_tick(y, ys)
            );
            y += ys;
        }
        let xs = tick_step(x1 - x0, 8.0).max(1.0);
        let mut x = (x0 / xs).ceil() * xs;
        while x <= x1 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                self.px(x),
                H - BOTTOM + 18.0,
                x as u64
            );
            x += xs;
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>
<text x="{}" y="{}" text-anchor="middle">step</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">loss</text>"##,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM,
            (LEFT + W - RIGHT) / 2.0,
            H - 12.0,
            (TOP + H - BOTTOM) / 2.0,
            (TOP + H - BOTTOM) / 2.0
        );
    }

    /// Writes the finite points of `pts` as a polyline with the stroke attributes `style`, if any.
    fn polyline(&self, s: &mut String, pts: &[(u64, f64)], style: &str) {
        let p: Vec<String> =
            pts.iter().filter(finite).map(|&(x, y)| format!("{:.1},{:.1}", self.px(x as f64), self.py(y))).collect();
        if !p.is_empty() {
            let _ = writeln!(s, r#"<polyline fill="none" {style} points="{}"/>"#, p.join(" "));
        }
    }
}

/// Each step's loss averaged with those of the steps before it, over about a twentieth of the run.
fn trailing_mean(train: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let w = (train.len() / 20).max(1);
    (0..train.len())
        .map(|i| {
            let window = &train[i.saturating_sub(w - 1)..=i];
            (train[i].0, window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64)
        })
        .collect()
}

/// Writes the legend naming the two curves, and closes the document.
fn legend(s: &mut String) {
    let lx = W - RIGHT - 260.0;
    let _ = write!(
        s,
        r##"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="#1f77b4" stroke-width="2"/><text x="{}" y="{}">train loss (mean of recent steps)</text>
<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="#ff7f0e" stroke-width="2"/><text x="{}" y="{}">validation loss</text>
</svg>
"##,
        lx + 24.0,
        TOP + 16.0,
        TOP + 16.0,
        lx + 30.0,
        TOP + 20.0,
        lx + 24.0,
        TOP + 34.0,
        TOP + 34.0,
        lx + 30.0,
        TOP + 38.0
    );
}

fn format_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}
