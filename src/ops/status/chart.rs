//! The status page's "Savings" charts: inline SVG drawn on the server from the traffic history
//! (see `history`), no JavaScript.
//!
//! Per hour (last 48 h) and per day (last 90 days): bytes served from the cache beside blob
//! bytes fetched upstream, the hit ratio, and upstream pulls avoided. Each chart is an
//! `<svg role="img">` with a `<title>`, each bar or point has a `<title>` with its bucket and
//! value, and each chart's totals over its window are in `data-` attributes of the `<svg>`
//! (`data-cache-bytes`, `data-upstream-bytes`, `data-hits`, `data-lookups`,
//! `data-pulls-avoided`) and in the text under it, for people and for tests to compare with
//! `/metrics`.

use std::fmt::Write as _;

use crate::config::human_bytes;
use crate::store::now_secs;

use super::history::{Bucket, Counters, DAYS, HOURS};
use super::render::esc;
use super::Traffic;

/// Series colours, distinct from the rest of the page's (so a screenshot can find them).
pub(super) const CACHE_COLOUR: &str = "#3a86ff";
pub(super) const UPSTREAM_COLOUR: &str = "#fb5607";
pub(super) const RATIO_COLOUR: &str = "#8338ec";
pub(super) const PULLS_COLOUR: &str = "#d99a00";

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 170.0;
/// Room for the y-axis labels on the left and the x-axis labels below.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

const STYLE: &str = "<style>.charts{display:flex;flex-wrap:wrap;gap:8px 24px}\
.charts figure{margin:0}.charts figcaption{font-size:12px;color:#56606b}\
.chart text{font:11px system-ui,sans-serif;fill:#56606b}.chart .axis{stroke:#c5cad1}\
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 8px}</style>";

/// One scale of the charts: its buckets and how they are named.
struct Scale<'a> {
    /// `hours` or `days`, in element ids.
    key: &'static str,
    /// "per hour, last 48 hours".
    span: &'static str,
    /// The left end of the x axis: "48 h ago".
    since: &'static str,
    buckets: &'a [Bucket],
    /// A bucket's name in titles.
    label: fn(u64) -> String,
}

/// A series of bars.
struct Series {
    /// The `data-` attribute of its total, and its CSS-free name in titles.
    attr: &'static str,
    what: &'static str,
    colour: &'static str,
    value: fn(&Counters) -> u64,
    fmt: fn(u64) -> String,
}

/// The bytes chart's two series.
const BYTES: [Series; 2] = [
    Series {
        attr: "cache-bytes",
        what: "served from the cache",
        colour: CACHE_COLOUR,
        value: |c| c.cache_bytes,
        fmt: human_bytes,
    },
    Series {
        attr: "upstream-bytes",
        what: "fetched upstream",
        colour: UPSTREAM_COLOUR,
        value: |c| c.upstream_bytes,
        fmt: human_bytes,
    },
];

/// The "Savings" section.
pub(super) fn savings(traffic: &Traffic, h: &mut String) {
    let (hours, days) = traffic.history();
    h.push_str("<section id=\"savings\"><h2>Savings</h2>");
    h.push_str(STYLE);
    let scales = [
        Scale {
            key: "hours",
            span: "per hour, last 48 hours",
            since: "48 h ago",
            buckets: &hours,
            label: hour_label,
        },
        Scale {
            key: "days",
            span: "per day (UTC), last 90 days",
            since: "90 days ago",
            buckets: &days,
            label: day_label,
        },
    ];
    debug_assert!(hours.len() == HOURS && days.len() == DAYS);
    for s in &scales {
        let _ = write!(h, "<h3>{}</h3><div class=\"charts\">", esc(s.span));
        bars(
            h,
            s,
            "bytes",
            "Bytes served from the cache and fetched upstream",
            &BYTES,
        );
        ratio(h, s);
        bars(
            h,
            s,
            "pulls",
            "Upstream pulls avoided (manifest GETs answered from the cache)",
            &[Series {
                attr: "pulls-avoided",
                what: "pulls avoided",
                colour: PULLS_COLOUR,
                value: |c| c.pulls_avoided,
                fmt: |n| n.to_string(),
            }],
        );
        h.push_str("</div>");
    }
    h.push_str(
        "<p class=\"muted\">Kept across restarts (the <code>/metrics</code> counters start \
         again at zero with each); bytes fetched upstream are blob bytes.</p></section>",
    );
}

fn svg_open(h: &mut String, id: &str, title: &str, attrs: &str) {
    let _ = write!(
        h,
        "<svg id=\"{id}\" class=\"chart\" role=\"img\" aria-labelledby=\"{id}-title\" \
         width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\"{attrs}>\
         <title id=\"{id}-title\">{}</title>",
        esc(title)
    );
}

/// The axes: the baseline, the top value's label and the window's ends.
fn axes(h: &mut String, s: &Scale, top: &str) {
    let base = HEIGHT - BOTTOM;
    let _ = write!(
        h,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base}\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{base}\" text-anchor=\"end\">0</text>\
         <text x=\"{LEFT}\" y=\"{}\">{}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">now</text>",
        WIDTH - RIGHT,
        LEFT - 4.0,
        TOP + 9.0,
        esc(top),
        LEFT - 4.0,
        HEIGHT - 6.0,
        esc(s.since),
        WIDTH - RIGHT,
        HEIGHT - 6.0,
    );
}

/// Bars, side by side per bucket, one per series.
fn bars(h: &mut String, s: &Scale, chart: &str, title: &str, series: &[Series]) {
    let id = format!("chart-{}-{chart}", s.key);
    let totals: Vec<u64> = series
        .iter()
        .map(|x| s.buckets.iter().map(|b| (x.value)(&b.counts)).sum())
        .collect();
    let mut attrs = String::new();
    for (x, t) in series.iter().zip(&totals) {
        let _ = write!(attrs, " data-{}=\"{t}\"", x.attr);
    }
    let full_title = format!("{title}, {}", s.span);
    let max = s
        .buckets
        .iter()
        .flat_map(|b| series.iter().map(|x| (x.value)(&b.counts)))
        .max()
        .unwrap_or(0);
    h.push_str("<figure>");
    svg_open(h, &id, &full_title, &attrs);
    axes(
        h,
        s,
        &if max == 0 {
            "0".into()
        } else {
            (series[0].fmt)(max)
        },
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / s.buckets.len().max(1) as f64;
    let bar_w = (slot * 0.8 / series.len() as f64).max(1.0);
    for (i, b) in s.buckets.iter().enumerate() {
        for (k, x) in series.iter().enumerate() {
            let v = (x.value)(&b.counts);
            if v == 0 {
                continue;
            }
            // At least a pixel tall, so that a small value next to a large one still shows.
            let bh = (v as f64 / max as f64 * plot_h).max(1.0);
            let _ = write!(
                h,
                "<rect class=\"{}\" fill=\"{}\" x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" \
                 height=\"{:.2}\" data-value=\"{v}\"><title>{}: {} {}</title></rect>",
                x.attr,
                x.colour,
                LEFT + i as f64 * slot + slot * 0.1 + k as f64 * bar_w,
                TOP + plot_h - bh,
                bar_w,
                bh,
                esc(&(s.label)(b.at)),
                esc(&(x.fmt)(v)),
                x.what,
            );
        }
    }
    if max == 0 {
        let _ = write!(
            h,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">nothing yet</text>",
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    h.push_str("</svg><figcaption>");
    for (x, t) in series.iter().zip(&totals) {
        let _ = write!(
            h,
            "<span class=\"sw\" style=\"background:{}\"></span>{}: <span id=\"{id}-{}\">{}</span>",
            x.colour,
            x.what,
            x.attr,
            esc(&(x.fmt)(*t))
        );
    }
    h.push_str("</figcaption></figure>");
}

/// The hit ratio: a point per bucket that had lookups, joined by a line.
fn ratio(h: &mut String, s: &Scale) {
    let id = format!("chart-{}-ratio", s.key);
    let total = Counters::total(s.buckets);
    let attrs = format!(
        " data-hits=\"{}\" data-lookups=\"{}\"",
        total.hits, total.lookups
    );
    h.push_str("<figure>");
    svg_open(h, &id, &format!("Cache hit ratio, {}", s.span), &attrs);
    axes(h, s, "100%");
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / s.buckets.len().max(1) as f64;
    let points: Vec<(f64, f64, &Bucket, f64)> = s
        .buckets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let r = b.counts.hit_ratio()?;
            Some((
                LEFT + (i as f64 + 0.5) * slot,
                TOP + plot_h * (1.0 - r),
                b,
                r,
            ))
        })
        .collect();
    if points.len() > 1 {
        let line: Vec<String> = points
            .iter()
            .map(|(x, y, _, _)| format!("{x:.2},{y:.2}"))
            .collect();
        let _ = write!(
            h,
            "<polyline fill=\"none\" stroke=\"{RATIO_COLOUR}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
    }
    for (x, y, b, r) in &points {
        let _ = write!(
            h,
            "<circle class=\"hit-ratio\" fill=\"{RATIO_COLOUR}\" cx=\"{x:.2}\" cy=\"{y:.2}\" \
             r=\"4\" data-hits=\"{}\" data-lookups=\"{}\"><title>{}: {:.1}% hit ratio \
             ({} of {} lookups)</title></circle>",
            b.counts.hits,
            b.counts.lookups,
            esc(&(s.label)(b.at)),
            r * 100.0,
            b.counts.hits,
            b.counts.lookups,
        );
    }
    if points.is_empty() {
        let _ = write!(
            h,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">nothing yet</text>",
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    let _ = write!(
        h,
        "</svg><figcaption><span class=\"sw\" style=\"background:{RATIO_COLOUR}\"></span>\
         hit ratio: <span id=\"{id}-total\">{}</span> ({} of {} lookups)</figcaption></figure>",
        total
            .hit_ratio()
            .map_or_else(|| "—".to_owned(), |r| format!("{:.1}%", r * 100.0)),
        total.hits,
        total.lookups,
    );
}

fn civil(secs: u64) -> time::OffsetDateTime {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn hour_label(at: u64) -> String {
    let t = civil(at.saturating_mul(3600));
    let now_hour = now_secs() / 3600;
    let ago = now_hour.saturating_sub(at);
    format!(
        "{}-{:02}-{:02} {:02}:00 UTC{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        if ago == 0 { " (this hour)" } else { "" }
    )
}

fn day_label(at: u64) -> String {
    let t = civil(at.saturating_mul(86_400));
    format!("{}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_carry_titles_values_and_totals() {
        let mut buckets: Vec<Bucket> = (0..HOURS as u64)
            .map(|at| Bucket {
                at: 500_000 + at,
                counts: Counters::default(),
            })
            .collect();
        buckets[10].counts = Counters {
            cache_bytes: 2048,
            upstream_bytes: 1024,
            hits: 3,
            lookups: 4,
            pulls_avoided: 2,
        };
        buckets[47].counts.upstream_bytes = 7;
        let s = Scale {
            key: "hours",
            span: "per hour",
            since: "48 h ago",
            buckets: &buckets,
            label: hour_label,
        };
        let mut h = String::new();
        bars(&mut h, &s, "bytes", "Bytes", &BYTES);
        assert!(h.contains("data-cache-bytes=\"2048\" data-upstream-bytes=\"1031\""));
        assert_eq!(
            h.matches("<rect").count(),
            3,
            "a bar per non-zero value: {h}"
        );
        assert!(h.contains("<title id=\"chart-hours-bytes-title\">Bytes, per hour</title>"));
        assert!(h.contains("2.0 KiB served from the cache</title>"), "{h}");
        assert!(h.contains("data-value=\"7\""));
        let mut r = String::new();
        ratio(&mut r, &s);
        assert!(r.contains("data-hits=\"3\" data-lookups=\"4\""));
        assert_eq!(r.matches("<circle").count(), 1);
        assert!(
            r.contains("75.0% hit ratio (3 of 4 lookups)</title>"),
            "{r}"
        );
        assert_eq!(day_label(20_789), "2026-12-02");
        assert!(hour_label(20_789 * 24 + 8).starts_with("2026-12-02 08:00 UTC"));
    }
}
