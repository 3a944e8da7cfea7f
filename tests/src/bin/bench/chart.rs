//! `latency.svg`: latency percentiles per system (p50, p90, p99, p99.9 on a log scale), one line
//! per system, hand-written SVG so any browser shows it and nothing heavy is needed to draw it.

use std::fmt::Write as _;

use crate::results::Results;

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

const COLORS: [&str; 6] = [
    "#444444", "#2b7bb9", "#e08214", "#b2182b", "#7b3294", "#1a9850",
];

const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "p50_us"),
    ("p90", "p90_us"),
    ("p99", "p99_us"),
    ("p99.9", "p999_us"),
];

/// The chart of `table`'s percentiles (medians over rounds), or `None` without data.
pub fn latency_svg(results: &Results, table: &str, title: &str) -> Option<String> {
    let mut lines: Vec<(&str, Vec<Option<f64>>)> = Vec::new();
    for system in results.systems(table) {
        let points: Vec<Option<f64>> = PERCENTILES
            .iter()
            .map(|(_, m)| results.median(table, system, m).filter(|v| *v > 0.0))
            .collect();
        if points.iter().any(Option::is_some) {
            lines.push((system.name(), points));
        }
    }
    let plot = Plot::covering(lines.iter().flat_map(|(_, p)| p.iter().flatten().copied()))?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"24\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        LEFT,
        escape(title)
    );
    plot.grid(&mut s);
    for (n, (name, points)) in lines.iter().enumerate() {
        plot.series(&mut s, n, name, points);
    }
    s.push_str("</svg>\n");
    Some(s)
}

/// The plot area: log-scale decades from `lo_exp` to `hi_exp` up, the percentiles across.
struct Plot {
    lo_exp: i32,
    hi_exp: i32,
}

impl Plot {
    /// The decades that cover `values`; `None` when there are none.
    fn covering(values: impl Iterator<Item = f64>) -> Option<Plot> {
        let values: Vec<f64> = values.collect();
        if values.is_empty() {
            return None;
        }
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(0.0, f64::max);
        let lo_exp = lo.log10().floor() as i32;
        let hi_exp = (hi.log10().ceil() as i32).max(lo_exp + 1);
        Some(Plot { lo_exp, hi_exp })
    }

    fn width() -> f64 {
        W - LEFT - RIGHT
    }

    fn height() -> f64 {
        H - TOP - BOTTOM
    }

    /// Where `v` goes up the plot.
    fn y(&self, v: f64) -> f64 {
        let span = f64::from(self.hi_exp - self.lo_exp);
        TOP + Self::height() * (1.0 - (v.log10() - f64::from(self.lo_exp)) / span)
    }

    /// Where percentile `i` goes across.
    fn x(&self, i: usize) -> f64 {
        LEFT + Self::width() * (i as f64 + 0.5) / PERCENTILES.len() as f64
    }

    /// The grid (every decade, with 2x and 5x ticks) and the axes' labels.
    fn grid(&self, s: &mut String) {
        for e in self.lo_exp..=self.hi_exp {
            for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
                let v = m * 10f64.powi(e);
                if e == self.hi_exp && m > 1.0 {
                    continue;
                }
                let yy = self.y(v);
                let stroke = if major { "#bbbbbb" } else { "#e5e5e5" };
                let _ = writeln!(
                    s,
                    "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"{stroke}\" stroke-width=\"1\"/>",
                    LEFT + Self::width()
                );
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{}</text>",
                    LEFT - 6.0,
                    yy + 4.0,
                    label(v)
                );
            }
        }
        for (i, (name, _)) in PERCENTILES.iter().enumerate() {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{name}</text>",
                self.x(i),
                TOP + Self::height() + 20.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">percentile (log scale latency; lower is better)</text>",
            LEFT + Self::width() / 2.0,
            H - 14.0
        );
    }

    /// System `n`'s line, its points (with their values on hover) and its legend entry.
    fn series(&self, s: &mut String, n: usize, name: &str, points: &[Option<f64>]) {
        let color = COLORS[n % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", self.x(i), self.y(v))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for (i, v) in points.iter().enumerate() {
            if let Some(v) = v {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"><title>{name} {}: {}</title></circle>",
                    self.x(i),
                    self.y(*v),
                    PERCENTILES[i].0,
                    label(*v)
                );
            }
        }
        let ly = TOP + 10.0 + 22.0 * n as f64;
        let lx = W - RIGHT + 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>\
             <text x=\"{}\" y=\"{}\">{name}</text>",
            lx + 22.0,
            lx + 28.0,
            ly + 4.0
        );
    }
}

fn label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", trim(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim(us / 1e3))
    } else {
        format!("{} µs", trim(us))
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
