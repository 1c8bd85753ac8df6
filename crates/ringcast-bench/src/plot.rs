//! `--plot FILE.svg`: throughput and latency per second, as an SVG anyone can open.
//!
//! Two stacked charts over the run's seconds (warm-up included, marked by a vertical line): messages
//! (or handshakes) per second, and p50/p99 latency of what arrived in that second. A run that degrades
//! over time, or stalls once, shows it here when the summary percentiles would hide it. Only the SVG
//! backend of plotters is compiled in (no fonts, no bitmap codecs).

use std::path::Path;

use plotters::prelude::*;

use crate::error::BenchError;
use crate::params::Scenario;
use crate::report::Report;

/// Draws the report's timeline into `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), BenchError> {
    let fail = |e: String| BenchError::Output { path: path.display().to_string(), message: e };
    // The run's last interval is usually a fraction of a second: drawn as a rate it would fake a drop.
    let whole: Vec<_> = report.timeline.iter().filter(|s| !s.partial).cloned().collect();
    let t = if whole.is_empty() { &report.timeline } else { &whole };
    if t.is_empty() {
        return Err(fail("nothing to plot: the run recorded no complete second".into()));
    }
    let last = t.iter().map(|s| s.second).max().unwrap_or(1).max(1) as f64;
    let max_rate = t.iter().map(|s| s.messages).max().unwrap_or(0).max(1) as f64 * 1.1;
    let max_ms = t.iter().filter_map(|s| s.p99_us).fold(0.0f64, f64::max).max(0.001) / 1000.0 * 1.1;
    let warmup = match report.scenario {
        Scenario::Echo | Scenario::Fanout => Some(report.params.warmup.as_secs_f64()).filter(|w| *w > 0.0),
        _ => None,
    };
    let unit = if report.scenario == Scenario::Connect { "handshakes/s" } else { "messages/s" };
    let title = format!("ringcast bench {} — {}", report.scenario.name(), report.params.url);

    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1000, 680)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&title, ("sans-serif", 18))?;
        let (top, bottom) = root.split_vertically(320);

        let mut rate = ChartBuilder::on(&top)
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..last, 0f64..max_rate)?;
        rate.configure_mesh().x_desc("second").y_desc(unit).draw()?;
        rate.draw_series(LineSeries::new(t.iter().map(|s| (f64::from(s.second), s.messages as f64)), &BLUE))?
            .label(unit)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        if let Some(w) = warmup {
            rate.draw_series(LineSeries::new(vec![(w, 0.0), (w, max_rate)], &RED))?
                .label("end of warm-up")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        }
        rate.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;

        let mut lat = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..last, 0f64..max_ms)?;
        lat.configure_mesh().x_desc("second").y_desc("latency (ms)").draw()?;
        let series = |pick: fn(&crate::report::Second) -> Option<f64>| {
            t.iter().filter_map(move |s| pick(s).map(|us| (f64::from(s.second), us / 1000.0))).collect::<Vec<_>>()
        };
        lat.draw_series(LineSeries::new(series(|s| s.p99_us), &MAGENTA))?
            .label("p99")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], MAGENTA));
        lat.draw_series(LineSeries::new(series(|s| s.p50_us), &GREEN))?
            .label("p50")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
        lat.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| fail(e.to_string()))
}
