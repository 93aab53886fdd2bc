//! The full latency spectrum as an HdrHistogram percentile distribution (`.hgrm`).
//!
//! The table is the one HdrHistogram's `outputPercentileDistribution` prints (and wrk2 with
//! `--latency`), with 5 ticks per half distance to 100 %: `Value` (the highest value equivalent
//! to the bucket reached, in the stated unit), `Percentile` (the level iterated to, 0 to 1),
//! `TotalCount` (calls at or below the value) and `1/(1-Percentile)` (the x axis of the usual
//! log-scaled percentile plots; absent on the 100 % line), then the `#[Mean ...]`, `#[Max ...]`
//! and `#[Buckets ...]` footer. Files open in HdrHistogram's plotter as they are. Comment lines
//! (`#`) before the table say what was measured and in which unit, since the format itself does
//! not.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::LATENCY_SIGNIFICANT_FIGURES;

/// Percentile ticks per half distance to 100 %, as HdrHistogram and wrk2 print.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The unit values are written in (the histogram records microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Milliseconds (HdrHistogram's and wrk2's usual unit; 3 decimals keep the microseconds).
    Ms,
    /// Microseconds, as recorded.
    Us,
}

impl Unit {
    /// Recorded microseconds per output unit.
    pub fn scale(self) -> f64 {
        match self {
            Unit::Ms => 1000.0,
            Unit::Us => 1.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Ms => "milliseconds",
            Unit::Us => "microseconds",
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Ms => "ms",
            Unit::Us => "µs",
        }
    }
}

/// One row of the distribution: (quantile iterated to, value in µs, calls at or below it).
pub fn percentile_rows(histogram: &Histogram<u64>) -> Vec<(f64, u64, u64)> {
    let mut total = 0u64;
    histogram
        .iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .map(|step| {
            total += step.count_since_last_iteration();
            (step.quantile_iterated_to(), step.value_iterated_to(), total)
        })
        .collect()
}

/// The `.hgrm` text of `histogram` (microseconds), written in `unit`, after `#` lines `about`.
pub fn percentile_distribution(histogram: &Histogram<u64>, unit: Unit, about: &[String]) -> String {
    let digits = LATENCY_SIGNIFICANT_FIGURES as usize;
    let scale = unit.scale();
    let mut out = String::new();
    for line in about {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(
        out,
        "# Values in {} ({} significant digits, recorded in microseconds)",
        unit.name(),
        digits
    );
    let _ = writeln!(out, "#");
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for (quantile, value, total) in percentile_rows(histogram) {
        let value = value as f64 / scale;
        if quantile < 1.0 {
            let inverse = 1.0 / (1.0 - quantile);
            let _ = writeln!(
                out,
                "{value:>12.digits$} {quantile:>2.12} {total:>10} {inverse:>14.2}"
            );
        } else {
            let _ = writeln!(out, "{value:>12.digits$} {quantile:>2.12} {total:>10}");
        }
    }
    let (mean, deviation, max) = if histogram.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            histogram.mean() / scale,
            histogram.stdev() / scale,
            histogram.max() as f64 / scale,
        )
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:>12.digits$}, StdDeviation   = {deviation:>12.digits$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:>12.digits$}, Total count    = {:>12}]",
        histogram.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        histogram.buckets(),
        sub_bucket_count(LATENCY_SIGNIFICANT_FIGURES)
    );
    out
}

/// HdrHistogram's sub-bucket count for `digits` significant figures: the power of two that
/// holds `2 x 10^digits` distinct values.
fn sub_bucket_count(digits: u8) -> u64 {
    (2 * 10u64.pow(u32::from(digits))).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    #[test]
    fn the_table_has_hdrhistograms_shape() {
        // Proves the header, the 5-ticks-per-half-distance rows, the last line and the footer.
        let mut histogram = new_histogram();
        for us in 1..=10_000u64 {
            histogram.record(us).unwrap();
        }
        let text = percentile_distribution(
            &histogram,
            Unit::Ms,
            &["latency of echo, corrected".to_string()],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "# latency of echo, corrected");
        assert!(lines[1].contains("milliseconds"), "{}", lines[1]);
        assert_eq!(
            lines[3],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[4], "");
        assert_eq!(
            lines[5],
            "       0.001 0.000000000000          1           1.00"
        );
        assert!(text.contains("       5.003 0.500000000000       5003           2.00\n"));
        assert!(text.contains("       9.007 0.900000000000       9007          10.00\n"));
        assert!(text.contains("       7.503 0.750000000000       7503           4.00\n"));
        let last = lines
            .iter()
            .rev()
            .find(|line| !line.starts_with('#'))
            .unwrap();
        assert_eq!(*last, "      10.007 1.000000000000      10000");
        assert!(text.contains("#[Mean    =        5.001, StdDeviation   =        2.887]"));
        assert!(text.contains("#[Max     =       10.007, Total count    =        10000]"));
        assert!(text.contains("#[Buckets ="));
        assert!(text.contains("SubBuckets     =         2048]"));
        let us = percentile_distribution(&histogram, Unit::Us, &[]);
        assert!(us.contains("    5003.000 0.500000000000"), "{us}");
        assert!(text.contains("#[Buckets =           22, SubBuckets     =         2048]"));
    }

    #[test]
    fn rows_climb_to_one_and_an_empty_histogram_still_prints() {
        // Proves quantiles increase to 1.0 with cumulative counts, and no data is not an error.
        let mut histogram = new_histogram();
        histogram.record_n(100, 99).unwrap();
        histogram.record(5_000).unwrap();
        let rows = percentile_rows(&histogram);
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0 && w[0].2 <= w[1].2));
        assert_eq!(rows.last().unwrap().0, 1.0);
        assert_eq!(rows.last().unwrap().2, 100);
        let empty = percentile_distribution(&new_histogram(), Unit::Ms, &[]);
        assert!(empty.contains("Total count    =            0]"));
    }
}
