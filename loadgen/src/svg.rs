//! Charts as hand-written SVG: latency by percentile, and latency against offered load.
//!
//! The percentile chart is the HdrHistogram plot: the x axis is `log10(1/(1-p))`, so 0 %, 90 %,
//! 99 %, 99.9 %, 99.99 % are evenly spaced and the tail gets as much room as the body; the y axis
//! is linear latency. The axis runs to the percentile the sample count supports (about
//! `1 - 1/count`) and the maximum is drawn at its right edge. The sweep chart puts offered load
//! on a linear x axis and latency on a log y axis (latency past the knee grows by orders of
//! magnitude), with the SLO and the highest sustainable rate marked.
//!
//! No dependencies: a fixed canvas, a few `<line>`, `<polyline>` and `<text>` elements.

use std::fmt::Write as _;

/// One line of a chart: label, colour, points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub colour: &'static str,
    pub dashed: bool,
    /// (x, y) in data units: for the percentile chart (quantile, milliseconds).
    pub points: Vec<(f64, f64)>,
}

/// Colours of successive series.
pub const PALETTE: [&str; 5] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 70.0;

/// Most nines the percentile axis shows (99.9999 %).
pub const NINES_MAX: u32 = 6;

fn plot_width() -> f64 {
    WIDTH - LEFT - RIGHT
}

fn plot_height() -> f64 {
    HEIGHT - TOP - BOTTOM
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step near `span / 5` (1, 2 or 5 times a power of ten).
pub fn nice_step(span: f64) -> f64 {
    assert!(span > 0.0 && span.is_finite(), "span {span}");
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A tick label without trailing zeros: `2`, `0.5`, `12.5`.
pub fn tick_label(value: f64) -> String {
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// `0%`, `90%`, `99%`, `99.9%` for 0, 1, 2, 3 nines.
pub fn nines_label(nines: u32) -> String {
    if nines == 0 {
        return "0%".to_string();
    }
    let percent = 100.0 - 100.0 / 10f64.powi(nines as i32);
    format!("{}%", tick_label(percent))
}

/// The position of quantile `q` on the percentile axis, in nines: `log10(1/(1-q))`.
pub fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        f64::INFINITY
    } else {
        -(1.0 - q).log10()
    }
}

struct Canvas {
    out: String,
}

impl Canvas {
    fn new(title: &str, subtitle: &str) -> Canvas {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
             viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">"
        );
        let _ = writeln!(
            out,
            "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>"
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">{}</text>",
            WIDTH / 2.0,
            escape(title)
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"42\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            WIDTH / 2.0,
            escape(subtitle)
        );
        Canvas { out }
    }

    fn x_tick(&mut self, x: f64, label: &str) {
        let bottom = TOP + plot_height();
        let _ = writeln!(
            self.out,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            bottom + 18.0,
            escape(label)
        );
    }

    fn y_tick(&mut self, y: f64, label: &str) {
        let right = LEFT + plot_width();
        let _ = writeln!(
            self.out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 8.0,
            y + 4.0,
            escape(label)
        );
    }

    fn axes(&mut self, x_label: &str, y_label: &str) {
        let bottom = TOP + plot_height();
        let _ = writeln!(
            self.out,
            "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"none\" \
             stroke=\"#333\"/>",
            plot_width(),
            plot_height()
        );
        let _ = writeln!(
            self.out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            LEFT + plot_width() / 2.0,
            bottom + 44.0,
            escape(x_label)
        );
        let middle = TOP + plot_height() / 2.0;
        let _ = writeln!(
            self.out,
            "<text x=\"22\" y=\"{middle:.1}\" text-anchor=\"middle\" \
             transform=\"rotate(-90 22 {middle:.1})\">{}</text>",
            escape(y_label)
        );
    }

    fn polyline(&mut self, series: &Series, pixels: &[(f64, f64)]) {
        if pixels.is_empty() {
            return;
        }
        let points: Vec<String> = pixels
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let dash = if series.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let _ = writeln!(
            self.out,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            series.colour,
            points.join(" ")
        );
        for (x, y) in pixels {
            let _ = writeln!(
                self.out,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2\" fill=\"{}\"/>",
                series.colour
            );
        }
    }

    fn legend(&mut self, entries: &[(String, &'static str, bool)]) {
        for (row, (label, colour, dashed)) in entries.iter().enumerate() {
            let y = TOP + 16.0 + 18.0 * row as f64;
            let x = LEFT + 12.0;
            let dash = if *dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            let _ = writeln!(
                self.out,
                "<line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{colour}\" \
                 stroke-width=\"2\"{dash}/>\n\
                 <text x=\"{}\" y=\"{}\">{}</text>",
                x + 24.0,
                x + 30.0,
                y + 4.0,
                escape(label)
            );
        }
    }

    fn horizontal_marker(&mut self, y: f64, label: &str) {
        let right = LEFT + plot_width();
        let _ = writeln!(
            self.out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"#000\" \
             stroke-dasharray=\"2 3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#000\" \
             stroke=\"white\" stroke-width=\"3\" paint-order=\"stroke\">{}</text>",
            LEFT + plot_width() * 0.5,
            y - 5.0,
            escape(label)
        );
    }

    fn vertical_marker(&mut self, x: f64, label: &str) {
        let bottom = TOP + plot_height();
        let _ = writeln!(
            self.out,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#2ca02c\" \
             stroke-dasharray=\"2 3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#2ca02c\">{}</text>",
            x - 4.0,
            bottom - 8.0,
            escape(label)
        );
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// Latency (ms) by percentile, HdrHistogram style. `samples` (the largest series' count) sets
/// how many nines the axis shows; `slo_ms` draws a horizontal line.
pub fn percentile_chart(
    title: &str,
    subtitle: &str,
    series: &[Series],
    samples: u64,
    slo_ms: Option<f64>,
) -> String {
    let nines_max = (samples.max(10) as f64)
        .log10()
        .ceil()
        .clamp(2.0, f64::from(NINES_MAX));
    let y_top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, y)| *y))
        .chain(slo_ms)
        .fold(0.0, f64::max);
    let y_step = nice_step(if y_top > 0.0 { y_top } else { 1.0 });
    let y_max = ((y_top / y_step).ceil().max(1.0)) * y_step;
    let to_x = |q: f64| LEFT + plot_width() * nines(q).min(nines_max) / nines_max;
    let to_y = |ms: f64| TOP + plot_height() * (1.0 - ms / y_max);

    let mut canvas = Canvas::new(title, subtitle);
    for tick in 0..=(nines_max as u32) {
        let x = LEFT + plot_width() * f64::from(tick) / nines_max;
        canvas.x_tick(x, &nines_label(tick));
    }
    let mut tick = 0.0;
    while tick <= y_max + y_step * 1e-9 {
        canvas.y_tick(to_y(tick), &tick_label(tick));
        tick += y_step;
    }
    canvas.axes(
        "percentile (log scale: 1/(1-p); the right edge is the maximum)",
        "latency (ms)",
    );
    for s in series {
        let pixels: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|(q, ms)| (to_x(*q), to_y(*ms)))
            .collect();
        canvas.polyline(s, &pixels);
    }
    if let Some(slo) = slo_ms {
        canvas.horizontal_marker(to_y(slo), &format!("SLO {} ms", tick_label(slo)));
    }
    let legend: Vec<(String, &'static str, bool)> = series
        .iter()
        .map(|s| (s.label.clone(), s.colour, s.dashed))
        .collect();
    canvas.legend(&legend);
    canvas.finish()
}

/// Latency (ms, log scale) against offered load (req/s): one point per sweep step and series.
pub fn load_chart(
    title: &str,
    subtitle: &str,
    series: &[Series],
    slo_ms: Option<f64>,
    sustainable_rate: Option<f64>,
) -> String {
    let values = || series.iter().flat_map(|s| s.points.iter());
    let x_top = values().map(|(x, _)| *x).fold(0.0, f64::max).max(1.0);
    let x_step = nice_step(x_top);
    let x_max = (x_top / x_step).ceil() * x_step;
    let positive = || values().map(|(_, y)| *y).chain(slo_ms).filter(|y| *y > 0.0);
    let y_low = positive().fold(f64::INFINITY, f64::min);
    let y_high = positive().fold(0.0, f64::max);
    let (decade_low, decade_high) = if y_low.is_finite() {
        (
            y_low.log10().floor() as i32,
            (y_high.log10().ceil() as i32).max(y_low.log10().floor() as i32 + 1),
        )
    } else {
        (-1, 1)
    };
    let span = f64::from(decade_high - decade_low);
    let to_x = |rate: f64| LEFT + plot_width() * rate / x_max;
    let to_y = |ms: f64| {
        let position = (ms.max(10f64.powi(decade_low)).log10() - f64::from(decade_low)) / span;
        TOP + plot_height() * (1.0 - position)
    };

    let mut canvas = Canvas::new(title, subtitle);
    let mut tick = 0.0;
    while tick <= x_max + x_step * 1e-9 {
        canvas.x_tick(to_x(tick), &tick_label(tick));
        tick += x_step;
    }
    for decade in decade_low..=decade_high {
        let value = 10f64.powi(decade);
        canvas.y_tick(to_y(value), &tick_label(value));
        if decade < decade_high {
            for minor in [2.0, 5.0] {
                let y = to_y(value * minor);
                canvas.y_tick(y, "");
            }
        }
    }
    canvas.axes("offered load (requests/s)", "latency (ms, log scale)");
    for s in series {
        let pixels: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|(rate, ms)| (to_x(*rate), to_y(*ms)))
            .collect();
        canvas.polyline(s, &pixels);
    }
    if let Some(slo) = slo_ms {
        canvas.horizontal_marker(to_y(slo), &format!("SLO {} ms", tick_label(slo)));
    }
    if let Some(rate) = sustainable_rate {
        canvas.vertical_marker(
            to_x(rate),
            &format!("sustainable {} req/s", tick_label(rate)),
        );
    }
    let legend: Vec<(String, &'static str, bool)> = series
        .iter()
        .map(|s| (s.label.clone(), s.colour, s.dashed))
        .collect();
    canvas.legend(&legend);
    canvas.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: Vec<(f64, f64)>) -> Series {
        Series {
            label: "p99 <corrected>".to_string(),
            colour: PALETTE[0],
            dashed: false,
            points,
        }
    }

    #[test]
    fn axes_use_round_numbers_and_nines() {
        // Proves tick steps, labels and the percentile axis positions.
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(3.7), 1.0);
        assert_eq!(nice_step(4000.0), 1000.0);
        assert_eq!(nice_step(0.9), 0.2);
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(nines_label(0), "0%");
        assert_eq!(nines_label(1), "90%");
        assert_eq!(nines_label(3), "99.9%");
        assert_eq!(nines_label(4), "99.99%");
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(nines(1.0), f64::INFINITY);
    }

    #[test]
    fn the_percentile_chart_is_well_formed_svg() {
        // Proves the chart opens and closes, escapes labels, and marks ticks and the SLO.
        let svg = percentile_chart(
            "latency by percentile",
            "echo at 3000 req/s",
            &[series(vec![
                (0.0, 1.0),
                (0.5, 2.0),
                (0.99, 5.0),
                (1.0, 9.0),
            ])],
            100_000,
            Some(10.0),
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(svg.contains("p99 &lt;corrected&gt;"));
        for label in [">0%<", ">90%<", ">99%<", ">99.9%<", ">99.99%<", ">99.999%<"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(!svg.contains(">99.9999%<"));
        assert!(svg.contains("SLO 10 ms"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 4);
    }

    #[test]
    fn the_load_chart_marks_the_sustainable_rate() {
        // Proves the sweep chart's log axis decades and its markers.
        let svg = load_chart(
            "sweep",
            "faulty",
            &[series(vec![(1000.0, 3.2), (2000.0, 3.5), (3000.0, 40.0)])],
            Some(10.0),
            Some(2000.0),
        );
        assert!(svg.contains(">1<") && svg.contains(">10<") && svg.contains(">100<"));
        assert!(svg.contains("sustainable 2000 req/s"));
        assert!(svg.contains(">3000<"));
        assert!(svg.ends_with("</svg>\n"));
        // No data at all still draws axes.
        assert!(load_chart("t", "s", &[], None, None).contains("</svg>"));
    }
}
