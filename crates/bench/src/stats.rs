//! Summary statistics over repeated runs.

use serde::Serialize;

/// Median and spread of a sample.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    /// Number of runs.
    pub runs: usize,
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (must be non-empty).
    pub fn of(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Summary { runs: n, median, min: v[0], max: v[n - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let s = Summary::of(&[5.0, 9.0, 1.0]);
        assert_eq!((s.min, s.max, s.runs), (1.0, 9.0, 3));
    }
}
