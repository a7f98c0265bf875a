//! Text output: result tables and the machine-readable `RESULT` line.

use std::fmt::Write as _;

use crate::load::LevelResult;

/// One row of a single-system table (also used for progress lines).
pub fn level_row(result: &LevelResult) -> String {
    format!(
        "{:>11} | {:>10.0} {:>8.2} {:>8.2} {:>7}",
        result.concurrency,
        result.ops_per_s(),
        result.quantile_ms(0.5),
        result.quantile_ms(0.99),
        result.errors,
    )
}

/// A table of one system's levels, headed by `title`.
pub fn single_table(title: &str, ops: &str, results: &[LevelResult]) -> String {
    let mut out = format!("{title}\n");
    let _ = writeln!(
        out,
        "{:>11} | {:>10} {:>8} {:>8} {:>7}",
        "concurrency", ops, "p50 ms", "p99 ms", "errors"
    );
    for result in results {
        let _ = writeln!(out, "{}", level_row(result));
    }
    append_first_errors(&mut out, title, results);
    out
}

/// Parley and etcd side by side per concurrency level, with the throughput
/// ratio Parley/etcd. Levels are matched by position.
pub fn comparison_table(parley: &[LevelResult], etcd: &[LevelResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>11} | {:^37} | {:^37} |",
        "", "Parley appends", "etcd puts"
    );
    let _ = writeln!(
        out,
        "{:>11} | {:>10} {:>8} {:>8} {:>7} | {:>10} {:>8} {:>8} {:>7} | {:>6}",
        "concurrency",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "ratio"
    );
    for (p, e) in parley.iter().zip(etcd) {
        let _ = writeln!(
            out,
            "{:>11} | {:>10.0} {:>8.2} {:>8.2} {:>7} | {:>10.0} {:>8.2} {:>8.2} {:>7} | {:>6.2}",
            p.concurrency,
            p.ops_per_s(),
            p.quantile_ms(0.5),
            p.quantile_ms(0.99),
            p.errors,
            e.ops_per_s(),
            e.quantile_ms(0.5),
            e.quantile_ms(0.99),
            e.errors,
            ratio(p, e),
        );
    }
    append_first_errors(&mut out, "Parley", parley);
    append_first_errors(&mut out, "etcd", etcd);
    out
}

/// The last line of a full run: throughput and p99 of both systems at one level.
pub fn result_line(parley: &LevelResult, etcd: &LevelResult) -> String {
    format!(
        "RESULT parley_appends_per_s={:.0} etcd_puts_per_s={:.0} ratio={:.2} parley_p99_ms={:.2} etcd_p99_ms={:.2}",
        parley.ops_per_s(),
        etcd.ops_per_s(),
        ratio(parley, etcd),
        parley.quantile_ms(0.99),
        etcd.quantile_ms(0.99),
    )
}

/// Parley's throughput over etcd's; 0 when etcd completed nothing.
fn ratio(parley: &LevelResult, etcd: &LevelResult) -> f64 {
    let etcd = etcd.ops_per_s();
    if etcd > 0.0 {
        parley.ops_per_s() / etcd
    } else {
        0.0
    }
}

/// Notes the first error of every level that had errors.
fn append_first_errors(out: &mut String, system: &str, results: &[LevelResult]) {
    for result in results {
        if let Some(error) = &result.first_error {
            let _ = writeln!(
                out,
                "  {system} at concurrency {}: {} errors, first: {error}",
                result.concurrency, result.errors
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::new_histogram;
    use std::time::Duration;

    fn level(concurrency: usize, ok: u64, latency_ms: u64) -> anyhow::Result<LevelResult> {
        let mut latency_us = new_histogram()?;
        for _ in 0..ok {
            latency_us.record(latency_ms * 1000)?;
        }
        Ok(LevelResult {
            concurrency,
            ok,
            errors: 0,
            elapsed: Duration::from_secs(2),
            latency_us,
            first_error: None,
        })
    }

    #[test]
    fn result_line_has_the_exact_format() -> anyhow::Result<()> {
        let line = result_line(&level(256, 3000, 5)?, &level(256, 2000, 8)?);
        assert_eq!(
            line,
            "RESULT parley_appends_per_s=1500 etcd_puts_per_s=1000 ratio=1.50 parley_p99_ms=5.00 etcd_p99_ms=8.00"
        );
        Ok(())
    }

    #[test]
    fn comparison_has_one_row_per_level() -> anyhow::Result<()> {
        let parley = [level(1, 10, 1)?, level(16, 100, 2)?];
        let etcd = [level(1, 20, 1)?, level(16, 50, 4)?];
        let table = comparison_table(&parley, &etcd);
        assert_eq!(table.lines().count(), 4);
        assert!(table
            .lines()
            .nth(3)
            .is_some_and(|row| row.ends_with("2.00")));
        Ok(())
    }
}
