//! Figures of repeated runs: median, min and max, ratios and verdicts.

use std::time::Duration;

/// Values of one measurement over its rounds.
#[derive(Debug, Clone, Default)]
pub struct Figure {
    values: Vec<f64>,
}

impl Figure {
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    pub fn push_ms(&mut self, d: Duration) {
        self.push(d.as_secs_f64() * 1000.0);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// `  label     12.3 unit (10.1..15.0)`
    pub fn line(&self, label: &str, unit: &str) -> String {
        format!("  {label:<34} {:>10.2} {unit:<5} ({:.2}..{:.2})", self.median(), self.min(), self.max())
    }
}

/// Prints whether a target is met.
pub fn verdict(target: &str, met: bool) {
    println!("  target: {target}: {}", if met { "MET" } else { "NOT MET" });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        let mut f = Figure::default();
        for v in [3.0, 1.0, 2.0] {
            f.push(v);
        }
        assert_eq!((f.median(), f.min(), f.max()), (2.0, 1.0, 3.0));
        f.push(10.0);
        assert_eq!(f.median(), 2.5);
        assert!(Figure::default().median().is_nan());
    }
}
