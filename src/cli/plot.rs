//! `loss.png`: the loss curves of a run, drawn with plotters into a bitmap (the font ships in
//! the `dejavu` crate, so no system font is needed).

use super::picture::write_rgb_png;
use aec::runtime::train::EpochMetrics;
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (800, 480);

/// Registers the embedded font once.
fn font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "the embedded font does not load".to_owned())
    })
    .clone()
}

/// Draws train and validation loss per epoch (log scale) with the pretraining stages shaded and
/// named, into `path`. Nothing is drawn without a finite, positive loss.
pub fn loss_png(path: &Path, metrics: &[EpochMetrics]) -> Result<(), String> {
    let points = |f: fn(&EpochMetrics) -> Option<f64>| -> Vec<(u64, f64)> {
        metrics
            .iter()
            .filter_map(|m| f(m).filter(|v| v.is_finite() && *v > 0.0).map(|v| (m.epoch, v)))
            .collect()
    };
    let train = points(|m| Some(m.train_loss));
    let val = points(|m| m.val_loss);
    let terms = metrics.iter().flat_map(|m| m.terms.values().copied()).filter(|v| v.is_finite() && *v > 0.0);
    let all: Vec<f64> = train.iter().chain(&val).map(|p| p.1).chain(terms).collect();
    let (Some(lo), Some(hi)) = (all.iter().copied().reduce(f64::min), all.iter().copied().reduce(f64::max))
    else {
        return Ok(());
    };
    // The learning rate, on its own axis at the right, when a schedule moved it.
    let lrs = points(|m| m.lr);
    let lr_range = lrs.iter().map(|p| p.1).fold((f64::INFINITY, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let moves = lr_range.0 < lr_range.1;
    font()?;
    let (first, last) = (metrics.first().map_or(1, |m| m.epoch), metrics.last().map_or(1, |m| m.epoch));
    let mut rgb = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    let draw = |rgb: &mut [u8]| -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let (lo, hi) = (lo / 1.5, hi * 1.5);
        let mut chart = ChartBuilder::on(&root)
            .caption("loss per epoch", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .right_y_label_area_size(if moves { 64 } else { 0 })
            .build_cartesian_2d(first.saturating_sub(1)..last.max(first + 1), (lo..hi).log_scale())?
            .set_secondary_coord(
                first.saturating_sub(1)..last.max(first + 1),
                (lr_range.0 / 1.5..lr_range.1 * 1.5).log_scale(),
            );
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("loss (log scale)")
            .label_style(("sans-serif", 14))
            .draw()?;
        // The phases of greedy pretraining, shaded by turns and named.
        let (mut start, mut band) = (0, 0);
        for (i, m) in metrics.iter().enumerate() {
            let ends = metrics.get(i + 1).is_none_or(|n| n.stage != m.stage);
            if let (true, Some(stage)) = (ends, &m.stage) {
                let from = metrics[start].epoch.saturating_sub(1);
                let shade = if band % 2 == 0 { RGBColor(232, 238, 250) } else { RGBColor(250, 242, 228) };
                band += 1;
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(from, lo), (m.epoch, hi)],
                    shade.filled(),
                )))?;
                chart.draw_series(std::iter::once(Text::new(
                    stage.clone(),
                    (from, hi / 1.3),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))?;
            }
            if ends {
                start = i + 1;
            }
        }
        chart
            .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        // Each term of a loss with several (a penalty beside the reconstruction loss).
        let names: Vec<&String> = metrics.last().map(|m| m.terms.keys().collect()).unwrap_or_default();
        if names.len() > 1 {
            let colors =
                [RGBColor(60, 160, 60), RGBColor(150, 90, 200), RGBColor(230, 140, 20), RGBColor(90, 90, 90)];
            for (k, name) in names.into_iter().enumerate() {
                let color = colors[k % colors.len()];
                let series: Vec<(u64, f64)> = metrics
                    .iter()
                    .filter_map(|m| {
                        m.terms.get(name).filter(|v| v.is_finite() && **v > lo / 1.5).map(|v| (m.epoch, *v))
                    })
                    .collect();
                chart
                    .draw_series(LineSeries::new(series, color.stroke_width(1)))?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(1)));
            }
        }
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
                .label("validation")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        if moves {
            let grey = RGBColor(120, 120, 120);
            chart
                .configure_secondary_axes()
                .y_desc("learning rate (log scale)")
                .label_style(("sans-serif", 14))
                .draw()?;
            chart
                .draw_secondary_series(LineSeries::new(lrs.iter().copied(), grey.stroke_width(1)))?
                .label("learning rate (right)")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw(&mut rgb).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    write_rgb_png(path, &rgb, (SIZE.0 as usize, SIZE.1 as usize))
}

/// One heat map: a weight per (down, across) pair of labels.
pub struct Heat {
    pub across: Vec<String>,
    pub down: Vec<String>,
    pub rows: Vec<Vec<f32>>,
}

/// Attention's weights, one heat map per sentence side by side (white 0, dark blue 1), the
/// source words across the top, the translation's down the left.
pub fn attention_png(path: &Path, maps: &[Heat]) -> Result<(), String> {
    font()?;
    let cell = 26u32;
    let margin = 90u32;
    let widths: Vec<u32> = maps.iter().map(|m| margin + cell * m.across.len() as u32 + 20).collect();
    let height = maps.iter().map(|m| margin + cell * m.down.len() as u32 + 20).max().unwrap_or(100);
    let size = (widths.iter().sum::<u32>().max(100), height);
    let mut rgb = vec![255u8; (size.0 * size.1 * 3) as usize];
    let draw = |rgb: &mut [u8]| -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut x0 = 0i32;
        for (m, w) in maps.iter().zip(&widths) {
            let (ox, oy) = (x0 + margin as i32, margin as i32);
            for (i, word) in m.across.iter().enumerate() {
                let style = ("sans-serif", 13).into_font().transform(FontTransform::Rotate270).color(&BLACK);
                root.draw(&Text::new(word.clone(), (ox + i as i32 * cell as i32 + 8, oy - 6), style))?;
            }
            for (t, word) in m.down.iter().enumerate() {
                let style = ("sans-serif", 13).into_font().color(&BLACK);
                root.draw(&Text::new(word.clone(), (x0 + 6, oy + t as i32 * cell as i32 + 7), style))?;
                for (s, &a) in m.rows.get(t).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
                    let v = (255.0 * (1.0 - a.clamp(0.0, 1.0))) as u8;
                    let color = RGBColor(v, v, 255 - (255 - v) / 3);
                    let (x, y) = (ox + s as i32 * cell as i32, oy + t as i32 * cell as i32);
                    root.draw(&Rectangle::new(
                        [(x, y), (x + cell as i32 - 1, y + cell as i32 - 1)],
                        color.filled(),
                    ))?;
                }
            }
            x0 += *w as i32;
        }
        root.present()?;
        Ok(())
    };
    draw(&mut rgb).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    write_rgb_png(path, &rgb, (size.0 as usize, size.1 as usize))
}
