//! `catapult plot RUN [RUN...] [-o DIR] [--steps N,M]`: PNG charts of runs' metrics —
//! loss and validation loss, learning rate, gradient norm, tokens/s, FFN experts per
//! token per layer against K_e, and per-layer x per-expert load heatmaps — with several
//! runs overlaid. `plots.json` in the output lists every file (and, for a heatmap, where
//! its cells are). Its line charts also draw `catapult bench growth|transfer`'s PNGs.

use crate::UsageContext;
use anyhow::{bail, Context};
use clap::Args;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Arguments of `catapult plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directories (holding metrics.jsonl) or metrics files; several are overlaid.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Output directory (default: <first run>/plots).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Steps for the expert-load heatmaps, comma-separated (default: the last step with
    /// router metrics). Each is matched to the nearest step that has them.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<u64>,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const W: u32 = 1000;
const H: u32 = 600;

/// Makes the embedded font plotters' "sans-serif" (once; it is ours, so it parses).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the embedded DejaVuSans.ttf does not parse"));
    });
}

/// One run's metrics lines.
struct Run {
    label: String,
    lines: Vec<serde_json::Value>,
}

impl Run {
    fn load(path: &Path) -> anyhow::Result<Run> {
        let file = if path.extension().is_some_and(|e| e == "jsonl") {
            path.to_path_buf()
        } else {
            path.join("metrics.jsonl")
        };
        let text = std::fs::read_to_string(&file).usage_context(|| {
            format!(
                "{}: cannot read the metrics (give a run directory holding metrics.jsonl)",
                file.display()
            )
        })?;
        let mut lines = Vec::new();
        // A live run may be writing its last line: an unterminated final line is skipped.
        let complete = if text.ends_with('\n') {
            text.as_str()
        } else {
            &text[..text.rfind('\n').map_or(0, |i| i + 1)]
        };
        for (i, l) in complete.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(l).usage_context(|| {
                format!(
                    "{}: line {} is not JSON (a metrics file written by `catapult train` \
                         holds one JSON object per line)",
                    file.display(),
                    i + 1
                )
            })?;
            lines.push(v);
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string());
        Ok(Run { label, lines })
    }

    /// (step, value) of every line with a number at `key`.
    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.lines
            .iter()
            .filter_map(|v| Some((v["step"].as_f64()?, v.get(key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    }

    /// The router objects, with their steps.
    fn router(&self) -> Vec<(u64, &serde_json::Value)> {
        self.lines
            .iter()
            .filter_map(|v| Some((v["step"].as_u64()?, v.get("router")?)))
            .collect()
    }
}

/// A line of a chart.
pub(crate) struct Curve {
    pub(crate) label: String,
    pub(crate) points: Vec<(f64, f64)>,
    pub(crate) color: RGBColor,
    /// A reference line: drawn dashed and straight from the first point to the last.
    pub(crate) dashed: bool,
}

pub(crate) fn palette(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    P[i % P.len()]
}

fn lighter(c: RGBColor) -> RGBColor {
    RGBColor(c.0 / 2 + 128, c.1 / 2 + 128, c.2 / 2 + 128)
}

/// A line chart of `curves` to `path`; false when there is nothing to draw.
pub(crate) fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: &[Curve],
) -> anyhow::Result<bool> {
    register_font();
    let all: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter().copied())
        .collect();
    if all.is_empty() {
        return Ok(false);
    }
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= y0 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
        y0 -= pad;
        y1 += pad;
    } else {
        let pad = (y1 - y0) * 0.05;
        y0 -= pad;
        y1 += pad;
    }
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| short(*y))
        .label_style(("sans-serif", 15))
        .draw()?;
    for c in curves {
        let color = c.color;
        let s = chart.draw_series(line_or_dashes(c.points.clone(), color, c.dashed))?;
        s.label(c.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()
        .with_context(|| format!("{}: cannot write the PNG", path.display()))?;
    Ok(true)
}

/// A tick label: plain for ordinary magnitudes, scientific for tiny or huge ones.
fn short(y: f64) -> String {
    let a = y.abs();
    if y == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{y:.1e}")
    } else if a >= 100.0 || y.fract() == 0.0 {
        format!("{y:.0}")
    } else {
        let t = format!("{y:.3}");
        t.trim_end_matches('0').to_string()
    }
}

/// A polyline, or for a reference line dashes from its first point to its last.
fn line_or_dashes(
    points: Vec<(f64, f64)>,
    color: RGBColor,
    dashed: bool,
) -> Vec<PathElement<(f64, f64)>> {
    if !dashed {
        return vec![PathElement::new(points, color.stroke_width(2))];
    }
    let (a, b) = (points[0], points[points.len() - 1]);
    let n = 40;
    (0..n)
        .step_by(2)
        .map(|i| {
            let t0 = i as f64 / n as f64;
            let t1 = (i + 1) as f64 / n as f64;
            let at = |t: f64| (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            PathElement::new(vec![at(t0), at(t1)], color.stroke_width(2))
        })
        .collect()
}

/// Where a heatmap's cells are, for readers of plots.json.
#[derive(serde::Serialize)]
struct HeatmapGrid {
    step: u64,
    layers: usize,
    experts: usize,
    /// Pixel column of the left edge of the first cell.
    x0: u32,
    /// Pixel row of the top edge of the first layer's cells.
    y0: u32,
    cell_w: u32,
    cell_h: u32,
}

/// Blue (under-loaded) through white (balanced, load x N = 1) to red (over-loaded).
fn load_color(relative: f64) -> RGBColor {
    let t = (relative.max(1e-6).log2() / 2.0).clamp(-1.0, 1.0); // 4x either way saturates
    let mix = |a: u8, b: u8, f: f64| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let mid = RGBColor(245, 245, 220);
    if t < 0.0 {
        let f = -t;
        RGBColor(mix(mid.0, 33, f), mix(mid.1, 102, f), mix(mid.2, 172, f))
    } else {
        RGBColor(mix(mid.0, 178, t), mix(mid.1, 24, t), mix(mid.2, 43, t))
    }
}

fn heatmap(path: &Path, run: &Run, step: u64, loads: &[Vec<f64>]) -> anyhow::Result<HeatmapGrid> {
    let layers = loads.len();
    let experts = loads.first().map_or(0, |l| l.len());
    if layers == 0 || experts == 0 {
        bail!(
            "{}: the router metrics at step {step} hold no expert loads",
            run.label
        );
    }
    let (left, top, right, bottom) = (90u32, 70u32, 40u32, 90u32);
    let cell_w = ((W - left - right) / experts as u32).max(3);
    let cell_h = ((H - top - bottom) / layers as u32).clamp(3, 80);
    let width = (left + right + cell_w * experts as u32).max(420);
    let height = top + bottom + cell_h * layers as u32;
    register_font();
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{}: expert load x N at step {step} (1 = balanced)",
        run.label
    );
    root.draw(&Text::new(
        title,
        (left as i32, 20),
        ("sans-serif", 20).into_font(),
    ))?;
    for (l, row) in loads.iter().enumerate() {
        let y = (top + l as u32 * cell_h) as i32;
        for (e, &load) in row.iter().enumerate() {
            let x = (left + e as u32 * cell_w) as i32;
            // A 1-pixel white gap around every cell keeps the cells countable.
            root.draw(&Rectangle::new(
                [(x, y), (x + cell_w as i32 - 2, y + cell_h as i32 - 2)],
                load_color(load * experts as f64).filled(),
            ))?;
            if cell_w >= 44 && cell_h >= 20 {
                root.draw(&Text::new(
                    format!("{:.2}", load * experts as f64),
                    (x + cell_w as i32 / 2 - 14, y + cell_h as i32 / 2 - 8),
                    ("sans-serif", 14).into_font(),
                ))?;
            }
        }
        root.draw(&Text::new(
            format!("layer {l}"),
            (10, y + cell_h as i32 / 2 - 8),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    let below = (top + cell_h * layers as u32 + 10) as i32;
    root.draw(&Text::new(
        format!("expert 0 .. {} (columns)", experts - 1),
        (left as i32, below),
        ("sans-serif", 14).into_font(),
    ))?;
    // The color scale: 1/4 .. 4 times the balanced load.
    for (i, rel) in [0.25, 0.5, 1.0, 2.0, 4.0].iter().enumerate() {
        let x = left as i32 + i as i32 * 80;
        let y = below + 25;
        root.draw(&Rectangle::new(
            [(x, y), (x + 18, y + 18)],
            load_color(*rel).filled(),
        ))?;
        root.draw(&Text::new(
            format!("{rel}"),
            (x + 22, y + 2),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    root.present()
        .with_context(|| format!("{}: cannot write the PNG", path.display()))?;
    Ok(HeatmapGrid {
        step,
        layers,
        experts,
        x0: left,
        y0: top,
        cell_w,
        cell_h,
    })
}

/// Renders the charts; prints the files written.
pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let runs = load_runs(&args.runs)?;
    let out = args.output.clone().unwrap_or_else(|| {
        let first = args.runs.first().expect("clap requires at least one run");
        let dir = if first.is_dir() {
            first.clone()
        } else {
            first.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        dir.join("plots")
    });
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut index = Index {
        out,
        files: Vec::new(),
    };
    loss_chart(&runs, &mut index)?;
    lr_chart(&runs, &mut index)?;
    for (file, title, y_label, key) in [
        (
            "grad_norm.png",
            "gradient norm (before clipping)",
            "L2 norm",
            "grad_norm",
        ),
        ("tokens_per_s.png", "throughput", "tokens/s", "tokens_per_s"),
    ] {
        let made = line_chart(
            &index.path(file),
            title,
            "step",
            y_label,
            &simple(&runs, key),
        )?;
        index.add(file, made, serde_json::json!({}));
    }
    experts_chart(&runs, &mut index)?;
    // Heatmaps of the first run at the chosen steps.
    let run0 = runs.first().expect("clap requires at least one run");
    heatmaps(run0, &args.steps, &mut index)?;
    let index_path = index.path("plots.json");
    std::fs::write(
        &index_path,
        serde_json::to_string_pretty(&index.files)? + "\n",
    )
    .with_context(|| format!("{}: cannot write", index_path.display()))?;
    for v in &index.files {
        println!("{}", index.path(v["file"].as_str().unwrap_or("")).display());
    }
    Ok(())
}

/// The runs named on the command line; runs with the same directory name are told apart
/// by their position.
fn load_runs(paths: &[PathBuf]) -> anyhow::Result<Vec<Run>> {
    let mut runs: Vec<Run> = paths
        .iter()
        .map(|p| Run::load(p))
        .collect::<Result<_, _>>()?;
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for (i, r) in runs.iter_mut().enumerate() {
        if labels.iter().filter(|l| **l == r.label).count() > 1 {
            r.label = format!("{} #{}", r.label, i + 1);
        }
    }
    Ok(runs)
}

/// The files written, for plots.json.
struct Index {
    out: PathBuf,
    files: Vec<serde_json::Value>,
}

impl Index {
    fn path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// Lists `name` (with `extra`'s fields) when it was `made`.
    fn add(&mut self, name: &str, made: bool, extra: serde_json::Value) {
        if made {
            let mut v = serde_json::json!({"file": name});
            if let serde_json::Value::Object(m) = extra {
                for (k, x) in m {
                    v[k] = x;
                }
            }
            self.files.push(v);
        }
    }
}

/// One curve of `key` per run that has it.
fn simple(runs: &[Run], key: &str) -> Vec<Curve> {
    runs.iter()
        .enumerate()
        .map(|(i, r)| Curve {
            label: r.label.clone(),
            points: r.series(key),
            color: palette(i),
            dashed: false,
        })
        .filter(|c| !c.points.is_empty())
        .collect()
}

/// loss.png: training (lighter) and validation loss of every run.
fn loss_chart(runs: &[Run], index: &mut Index) -> anyhow::Result<()> {
    let mut loss = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        loss.push(Curve {
            label: format!("{} train", r.label),
            points: r.series("loss"),
            color: lighter(palette(i)),
            dashed: false,
        });
        loss.push(Curve {
            label: format!("{} validation", r.label),
            points: r.series("val_loss"),
            color: palette(i),
            dashed: false,
        });
    }
    loss.retain(|c| !c.points.is_empty());
    let made = line_chart(
        &index.path("loss.png"),
        "loss",
        "step",
        "cross-entropy (nats)",
        &loss,
    )?;
    index.add("loss.png", made, serde_json::json!({}));
    Ok(())
}

/// lr.png: the schedule, and each group whose rate differs from it (width transfer).
fn lr_chart(runs: &[Run], index: &mut Index) -> anyhow::Result<()> {
    let mut lr = simple(runs, "lr");
    for (i, r) in runs.iter().enumerate() {
        // Groups whose rate differs from the schedule's (width transfer) get their own line.
        let base = r.series("lr");
        let mut groups: Vec<String> = r
            .lines
            .iter()
            .filter_map(|v| v.as_object())
            .flat_map(|o| {
                o.keys()
                    .filter(|k| k.starts_with("lr_"))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        groups.sort();
        groups.dedup();
        for g in groups {
            let s = r.series(&g);
            if s.len() == base.len() && s.iter().zip(&base).all(|(a, b)| a.1 == b.1) {
                continue;
            }
            lr.push(Curve {
                label: format!("{} {}", r.label, &g[3..]),
                points: s,
                color: palette(i + lr.len()),
                dashed: false,
            });
        }
    }
    let made = line_chart(&index.path("lr.png"), "learning rate", "step", "lr", &lr)?;
    index.add("lr.png", made, serde_json::json!({}));
    Ok(())
}

/// ffn_experts_per_token.png: FFN experts per token of every layer, against K_e.
fn experts_chart(runs: &[Run], index: &mut Index) -> anyhow::Result<()> {
    let mut experts = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let router = r.router();
        let layers = router
            .iter()
            .filter_map(|(_, v)| {
                v["ffn_experts_per_token_per_layer"]
                    .as_array()
                    .map(|a| a.len())
            })
            .max()
            .unwrap_or(0);
        for l in 0..layers {
            let points: Vec<(f64, f64)> = router
                .iter()
                .filter_map(|(s, v)| {
                    Some((*s as f64, v["ffn_experts_per_token_per_layer"][l].as_f64()?))
                })
                .collect();
            experts.push(Curve {
                label: format!("{} layer {l}", r.label),
                points,
                color: palette(i * layers + l),
                dashed: false,
            });
        }
        if let (Some(first), Some(last), Some(ke)) = (
            router.first(),
            router.last(),
            router
                .last()
                .and_then(|(_, v)| v["target_ffn_experts"].as_f64()),
        ) {
            experts.push(Curve {
                label: format!("{} K_e = {ke}", r.label),
                points: vec![(first.0 as f64, ke), (last.0 as f64, ke)],
                color: BLACK,
                dashed: true,
            });
        }
    }
    let made = line_chart(
        &index.path("ffn_experts_per_token.png"),
        "FFN experts per token, per layer",
        "step",
        "experts",
        &experts,
    )?;
    index.add("ffn_experts_per_token.png", made, serde_json::json!({}));
    Ok(())
}

/// expert_load_stepS.png for each of `steps` (default: the last step with loads), each
/// matched to the nearest step of `run0` that has per-expert loads.
fn heatmaps(run0: &Run, steps: &[u64], index: &mut Index) -> anyhow::Result<()> {
    let router: Vec<(u64, &serde_json::Value)> = run0
        .router()
        .into_iter()
        .filter(|(_, v)| v["expert_load_per_layer"].is_array())
        .collect();
    let Some(&(last, _)) = router.last() else {
        eprintln!(
            "plot: {} has no per-expert loads (router metrics with expert_load_per_layer); no heatmap",
            run0.label
        );
        return Ok(());
    };
    let wanted = if steps.is_empty() {
        vec![last]
    } else {
        steps.to_vec()
    };
    let mut done = Vec::new();
    for want in wanted {
        let (step, v) = router
            .iter()
            .min_by_key(|(s, _)| s.abs_diff(want))
            .expect("router holds at least its last step");
        if done.contains(step) {
            continue;
        }
        done.push(*step);
        let loads: Vec<Vec<f64>> = serde_json::from_value(v["expert_load_per_layer"].clone())
            .context("expert_load_per_layer is not a list of lists of numbers")?;
        let name = format!("expert_load_step{step}.png");
        let grid = heatmap(&index.path(&name), run0, *step, &loads)?;
        index.add(&name, true, serde_json::to_value(&grid)?);
    }
    Ok(())
}
