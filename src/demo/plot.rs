//! The demo report's charts, drawn with `plotters` into inline SVG: training curves
//! (one line per seed, labelled axes) and per-family bars (the mean over seeds with
//! the seeds' range as a whisker). SVG only, so no font or bitmap back-end is linked:
//! text is left to the browser.

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Line colours, one per series (seed or policy), in order.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x88, 0x88, 0x88),
    RGBColor(0x2f, 0x5f, 0xd0),
    RGBColor(0x7a, 0xa0, 0xf0),
    RGBColor(0xd0, 0x7a, 0x2f),
    RGBColor(0x2f, 0x9d, 0x5f),
    RGBColor(0x9d, 0x2f, 0x8a),
];

/// The whiskers' colour (distinct from the axes' black).
const WHISKER: RGBColor = RGBColor(0x22, 0x22, 0x22);

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn plot_error<E: std::fmt::Debug>(e: E) -> Error {
    Error::Invalid(format!("drawing a report chart: {e:?}"))
}

/// (lo, hi) of `values`, widened so that a flat series still gets an axis.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// A training curve: `series` are (label, (step, value) points), one line each, on
/// axes labelled `step` and `metric`.
pub fn curve_svg(
    title: &str,
    metric: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420, 260)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let points = || series.iter().flat_map(|(_, p)| p.iter());
        let (x0, x1) = span(points().map(|p| p.0));
        let (y0, y1) = span(points().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(metric)
            .x_labels(6)
            .y_labels(6)
            .light_line_style(BLACK.mix(0.03))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(plot_error)?;
        for (i, (label, pts)) in series.iter().enumerate() {
            let c = color(i + 1);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(plot_error)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], c.stroke_width(2))
                });
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 11))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// One bar series: its label and, per category, (mean, lowest, highest).
pub type BarSeries = (String, Vec<(f64, f64, f64)>);

/// Grouped bars: one group per category, one bar per series (its mean), with a
/// whisker from the lowest to the highest value when they differ (the seeds' range).
pub fn bars_svg(y_desc: &str, categories: &[&str], series: &[BarSeries]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let values = || {
            series
                .iter()
                .flat_map(|(_, v)| v.iter().flat_map(|t| [t.0, t.1, t.2]))
        };
        let (lo, hi) = span(values().chain([0.0]));
        let n = categories.len().max(1) as f64;
        let names = categories.to_vec();
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5..n - 0.5, lo..hi)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(BLACK.mix(0.03))
            .x_labels(categories.len().max(1))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    names
                        .get(i as usize)
                        .map_or(String::new(), |s| s.to_string())
                } else {
                    String::new()
                }
            })
            .y_desc(y_desc)
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(-0.5, 0.0), (n - 0.5, 0.0)],
                BLACK.stroke_width(1),
            )))
            .map_err(plot_error)?;
        let width = 0.8 / series.len().max(1) as f64;
        for (s, (label, per_category)) in series.iter().enumerate() {
            let c = color(s);
            let left = |cat: usize| cat as f64 - 0.4 + s as f64 * width;
            chart
                .draw_series(per_category.iter().enumerate().map(|(cat, &(mean, _, _))| {
                    Rectangle::new(
                        [
                            (left(cat) + 0.05 * width, 0.0),
                            (left(cat) + 0.95 * width, mean),
                        ],
                        c.filled(),
                    )
                }))
                .map_err(plot_error)?
                .label(label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
            chart
                .draw_series(
                    per_category
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| t.2 - t.1 > 1e-12)
                        .map(|(cat, &(_, low, high))| {
                            let mid = left(cat) + 0.5 * width;
                            PathElement::new(
                                vec![
                                    (mid - 0.2 * width, low),
                                    (mid + 0.2 * width, low),
                                    (mid, low),
                                    (mid, high),
                                    (mid - 0.2 * width, high),
                                    (mid + 0.2 * width, high),
                                ],
                                WHISKER.stroke_width(1),
                            )
                        }),
                )
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of every `<text>` element (plotters puts them on their own line).
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn a_curve_has_its_axis_labels_and_one_line_per_series() {
        let series = vec![
            (
                "seed 0".to_string(),
                vec![(0.0, 2.0), (10.0, 1.5), (20.0, 1.0)],
            ),
            (
                "seed 1".to_string(),
                vec![(0.0, 2.2), (10.0, 1.4), (20.0, 0.9)],
            ),
        ];
        let svg = curve_svg("sft", "train/loss", &series).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        let t = texts(&svg);
        for want in ["sft", "step", "train/loss", "seed 0", "seed 1"] {
            assert!(t.iter().any(|x| x == want), "{want} in {t:?}");
        }
        let lines = svg.matches(r#"stroke-width="2""#).count();
        assert_eq!(lines, 2 + 2, "two lines and two legend marks");
    }

    #[test]
    fn bars_show_every_category_and_a_whisker_only_where_seeds_differ() {
        let series = vec![
            ("sft".to_string(), vec![(-1.0, -1.0, -1.0), (0.5, 0.0, 1.0)]),
            ("ppo".to_string(), vec![(1.0, 1.0, 1.0), (0.2, 0.2, 0.2)]),
        ];
        let svg = bars_svg("mean gold score", &["arithmetic", "known"], &series).unwrap();
        let t = texts(&svg);
        for want in ["arithmetic", "known", "sft", "ppo", "mean gold score"] {
            assert!(t.iter().any(|x| x == want), "{want} in {t:?}");
        }
        // Four bars and two legend boxes (plus the background rectangles).
        let filled = svg.matches("<rect").count();
        assert!(filled >= 6, "{filled} rects");
        // One whisker: (sft, known), the only bar whose seeds differ.
        assert_eq!(svg.matches(r##"stroke="#222222""##).count(), 1, "{svg}");
    }
}
