//! PNG plots with `plotters` (bitmap backend only): loss curves per stage and routing
//! load per expert per layer.
//!
//! Text is drawn from the public-domain 8×8 bitmap font of `font8x8`, pixel by pixel,
//! so plots render identically on a machine without any system font (plotters' own
//! text needs FreeType/fontconfig or a font file). Non-ASCII characters print as `?`.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::metrics::{MetricLine, RoutingStats};

/// One named line of `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn plot_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Width in pixels of `text` at `scale`.
fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 8 * scale
}

/// Draw `text` with its top-left corner at `(x, y)`.
fn draw_text(
    area: &Area<'_>,
    text: &str,
    x: i32,
    y: i32,
    scale: i32,
    color: &RGBColor,
) -> std::result::Result<(), String> {
    for (i, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let gx = x + i as i32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    let px = gx + col * scale;
                    let py = y + row as i32 * scale;
                    for dy in 0..scale {
                        for dx in 0..scale {
                            area.draw_pixel((px + dx, py + dy), color)
                                .map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A "nice" tick step for a range (1, 2 or 5 × 10^k).
fn nice_step(span: f64, target: usize) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.1e}");
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// Plot `series` as lines in one chart with a title, axis names and a legend.
pub fn plot_loss_curves(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    draw_lines(path, title, x_label, y_label, series).map_err(|e| plot_err(path, e))
}

fn draw_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> std::result::Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let (w, h) = (960u32, 560u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), (x, y)| (a.min(*x), b.max(*x), c.min(*y), d.max(*y)),
    );
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        let pad = y0.abs().max(1.0) * 0.05;
        y0 -= pad;
        y1 += pad;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (left, right, top, bottom) = (80i32, 200i32, 44i32, 56i32);
    let black = RGBColor(0, 0, 0);
    let grey = RGBColor(225, 225, 225);
    draw_text(&root, title, left, 14, 2, &black)?;
    let plot = root.margin(top as u32, bottom as u32, left as u32, right as u32);
    let mut chart = ChartBuilder::on(&plot)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    // grid + tick labels (drawn on the root in pixel coordinates)
    let xs = nice_step(x1 - x0, 8);
    let ys = nice_step(y1 - y0, 6);
    let mut t = (x0 / xs).ceil() * xs;
    while t <= x1 + 1e-9 {
        let (px, _) = chart.backend_coord(&(t, y0));
        root.draw(&PathElement::new(
            vec![(px, top), (px, h as i32 - bottom)],
            grey,
        ))
        .map_err(|e| e.to_string())?;
        let label = fmt_tick(t, xs);
        draw_text(
            &root,
            &label,
            px - text_width(&label, 1) / 2,
            h as i32 - bottom + 6,
            1,
            &black,
        )?;
        t += xs;
    }
    let mut t = (y0 / ys).ceil() * ys;
    while t <= y1 + 1e-12 {
        let (_, py) = chart.backend_coord(&(x0, t));
        root.draw(&PathElement::new(
            vec![(left, py), (w as i32 - right, py)],
            grey,
        ))
        .map_err(|e| e.to_string())?;
        let label = fmt_tick(t, ys);
        draw_text(
            &root,
            &label,
            left - 6 - text_width(&label, 1),
            py - 4,
            1,
            &black,
        )?;
        t += ys;
    }
    root.draw(&Rectangle::new(
        [(left, top), (w as i32 - right, h as i32 - bottom)],
        black.stroke_width(1),
    ))
    .map_err(|e| e.to_string())?;
    draw_text(
        &root,
        x_label,
        left + (w as i32 - left - right - text_width(x_label, 1)) / 2,
        h as i32 - 22,
        1,
        &black,
    )?;
    draw_text(&root, y_label, 8, top - 14, 1, &black)?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if points.len() == 1 {
            chart
                .draw_series(std::iter::once(Circle::new(points[0], 3, color.filled())))
                .map_err(|e| e.to_string())?;
        } else {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
        }
        let ly = top + 10 + i as i32 * 18;
        let lx = w as i32 - right + 12;
        root.draw(&Rectangle::new(
            [(lx, ly), (lx + 14, ly + 8)],
            color.filled(),
        ))
        .map_err(|e| e.to_string())?;
        let name: String = s.name.chars().take(20).collect();
        draw_text(&root, &name, lx + 20, ly, 1, &black)?;
    }
    root.present().map_err(|e| e.to_string())
}

/// One loss plot per stage found in `metrics` (`loss_<stage>.png` in `dir`): training
/// loss per step, validation loss per validation, and the model's named loss terms.
/// Returns the files written.
pub fn plot_stage_losses(metrics: &[MetricLine], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut stages: Vec<String> = Vec::new();
    for m in metrics {
        let s = match m {
            MetricLine::Train(t) => &t.stage,
            MetricLine::Eval(e) => &e.stage,
        };
        if !stages.contains(s) {
            stages.push(s.clone());
        }
    }
    let mut out = Vec::new();
    for stage in stages {
        let mut series = vec![Series {
            name: "train loss".into(),
            points: Vec::new(),
        }];
        let mut val = Series {
            name: "val loss".into(),
            points: Vec::new(),
        };
        for m in metrics {
            match m {
                MetricLine::Train(t) if t.stage == stage => {
                    series[0].points.push((t.step as f64, t.loss));
                    for (name, v) in &t.terms {
                        match series.iter_mut().find(|s| &s.name == name) {
                            Some(s) => s.points.push((t.step as f64, *v)),
                            None => series.push(Series {
                                name: name.clone(),
                                points: vec![(t.step as f64, *v)],
                            }),
                        }
                    }
                }
                MetricLine::Eval(e) if e.stage == stage => {
                    val.points.push((e.step as f64, e.val_loss))
                }
                _ => {}
            }
        }
        if !val.points.is_empty() {
            series.insert(1, val);
        }
        let path = dir.join(format!("loss_{stage}.png"));
        plot_loss_curves(
            &path,
            &format!("loss - stage {stage}"),
            "optimizer step",
            "loss",
            &series,
        )?;
        out.push(path);
    }
    Ok(out)
}

/// Heatmap of routing load: one row per layer, one column per expert, cell shade and
/// number = share of that layer's routed tokens sent to the expert.
pub fn plot_routing_load(path: &Path, stats: &RoutingStats, expert_names: &[String]) -> Result<()> {
    draw_heatmap(path, stats, expert_names).map_err(|e| plot_err(path, e))
}

fn draw_heatmap(
    path: &Path,
    stats: &RoutingStats,
    expert_names: &[String],
) -> std::result::Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let n_layers = stats.load.len();
    let n_exp = stats.load.first().map_or(0, Vec::len);
    if n_layers == 0 || n_exp == 0 {
        return Err("no routing load to plot".into());
    }
    if stats.load.iter().any(|r| r.len() != n_exp) {
        return Err("rows of `load` differ in length".into());
    }
    let label_w = stats
        .layers
        .iter()
        .map(|l| l.chars().count().min(40))
        .max()
        .unwrap_or(6)
        .max(6) as i32
        * 8
        + 16;
    let cell_w = 96i32;
    let cell_h = if n_layers <= 40 { 22i32 } else { 12 };
    let top = 64i32;
    let w = (label_w + cell_w * n_exp as i32 + 24) as u32;
    let h = (top + cell_h * n_layers as i32 + 40) as u32;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let black = RGBColor(0, 0, 0);
    draw_text(&root, "routing load per expert per layer", 8, 10, 2, &black)?;
    let max = stats
        .load
        .iter()
        .flatten()
        .fold(0f64, |m, v| if v.is_finite() { m.max(*v) } else { m })
        .max(1e-12);
    for (e, name) in (0..n_exp).map(|e| {
        (
            e,
            expert_names
                .get(e)
                .cloned()
                .unwrap_or_else(|| format!("expert {e}")),
        )
    }) {
        let name: String = name.chars().take(11).collect();
        let x = label_w + e as i32 * cell_w + (cell_w - text_width(&name, 1)) / 2;
        draw_text(&root, &name, x, top - 14, 1, &black)?;
    }
    for (l, row) in stats.load.iter().enumerate() {
        let y = top + l as i32 * cell_h;
        let label: String = stats
            .layers
            .get(l)
            .cloned()
            .unwrap_or_else(|| format!("layer {l}"));
        let label: String = if label.chars().count() > 40 {
            label.chars().skip(label.chars().count() - 40).collect()
        } else {
            label
        };
        if cell_h >= 12 {
            draw_text(&root, &label, 8, y + (cell_h - 8) / 2, 1, &black)?;
        }
        for (e, v) in row.iter().enumerate() {
            let x = label_w + e as i32 * cell_w;
            let t = (v / max).clamp(0.0, 1.0);
            // white → dark blue
            let c = RGBColor(
                (255.0 - t * (255.0 - 8.0)) as u8,
                (255.0 - t * (255.0 - 48.0)) as u8,
                (255.0 - t * (255.0 - 107.0)) as u8,
            );
            root.draw(&Rectangle::new(
                [(x, y), (x + cell_w - 1, y + cell_h - 1)],
                c.filled(),
            ))
            .map_err(|e| e.to_string())?;
            if cell_h >= 20 {
                let txt = format!("{v:.3}");
                let fg = if t > 0.55 { WHITE } else { black };
                draw_text(
                    &root,
                    &txt,
                    x + (cell_w - text_width(&txt, 1)) / 2,
                    y + (cell_h - 8) / 2,
                    1,
                    &fg,
                )?;
            }
        }
    }
    root.present().map_err(|e| e.to_string())
}
