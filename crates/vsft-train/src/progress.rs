//! What a run shows while it trains. On a terminal: a bar with step/total, loss, learning rate,
//! tokens/s and the ETA, redrawn in place. Anywhere else (a pipe, a log file, a SLURM job's
//! output), no bar and no control characters: one plain line per log step instead, as
//! transformers' Trainer prints its log dicts when tqdm is off.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    /// `Some` only when stderr, where the bar is drawn, is a terminal.
    bar: Option<ProgressBar>,
    total: usize,
    started: Instant,
    first_step: usize,
    /// Prints nothing at all.
    quiet: bool,
}

/// What the bar and the plain line show about a step.
pub struct StepView {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
}

impl Progress {
    /// A bar over `total` steps, starting at `step` (non-zero on resume).
    pub fn new(total: usize, step: usize) -> Self {
        Self::with_terminal(total, step, std::io::stderr().is_terminal())
    }

    /// Shows nothing (the ranks other than rank 0 of a data-parallel run).
    pub fn silent(total: usize, step: usize) -> Self {
        Progress { bar: None, total, started: Instant::now(), first_step: step, quiet: true }
    }

    fn with_terminal(total: usize, step: usize, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]").expect("a valid template"),
            );
            bar.set_position(step as u64);
            bar
        });
        Progress { bar, total, started: Instant::now(), first_step: step, quiet: false }
    }

    /// Before the first step: on a GPU backend it compiles and autotunes kernels, which can take
    /// a minute; say so rather than show a bar that looks frozen.
    pub fn starting(&self, what: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(what.to_string()),
            None if !self.quiet => eprintln!("vsft: {what}"),
            None => {}
        }
    }

    /// After every step: redraws the bar (a no-op without a terminal).
    pub fn stepped(&self, v: &StepView) {
        if let Some(bar) = &self.bar {
            bar.set_position(v.step as u64);
            bar.set_message(format!("loss {:.4}  lr {:.2e}  {:.0} tok/s", v.loss, v.lr, v.tokens_per_s));
        }
    }

    /// At a log step: without a terminal, one line with what the bar would show.
    pub fn logged(&self, v: &StepView) {
        if self.bar.is_none() && !self.quiet {
            eprintln!("{}", self.line(v, self.started.elapsed()));
        }
    }

    fn line(&self, v: &StepView, elapsed: Duration) -> String {
        let done = v.step.saturating_sub(self.first_step).max(1) as f64;
        let eta = elapsed.as_secs_f64() / done * self.total.saturating_sub(v.step) as f64;
        format!(
            "vsft: step {}/{}  loss {:.4}  lr {:.2e}  {:.0} tok/s  elapsed {}  eta {}",
            v.step,
            self.total,
            v.loss,
            v.lr,
            v.tokens_per_s,
            clock(elapsed.as_secs_f64()),
            clock(eta)
        )
    }

    /// A message that must not be drawn over by the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None if !self.quiet => eprintln!("{}", msg.as_ref()),
            None => {}
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `h:mm:ss`, as the bar's `{eta_precise}` shows it.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_a_log_step_is_one_plain_line_with_the_eta() {
        let p = Progress::with_terminal(100, 20, false);
        let v = StepView { step: 30, loss: 1.23456, lr: 2e-3, tokens_per_s: 1234.4 };
        // 10 steps in 50 s: the 70 left take 350 s.
        let line = p.line(&v, Duration::from_secs(50));
        assert_eq!(line, "vsft: step 30/100  loss 1.2346  lr 2.00e-3  1234 tok/s  elapsed 0:00:50  eta 0:05:50");
        assert!(!line.contains('\r') && !line.contains('\x1b'));
    }

    #[test]
    fn the_clock_reads_hours_minutes_seconds() {
        assert_eq!(clock(3725.4), "1:02:05");
        assert_eq!(clock(-1.0), "0:00:00");
    }
}
