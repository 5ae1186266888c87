//! `report.html`: one self-contained page (no network, no scripts) of what a run did: curves
//! drawn with plotters as inline SVG, the parameter groups and what trains, skipped rows,
//! sample answers with their pictures, and the recipe.
//!
//! It reads what training leaves in its output directory: `metrics.jsonl`, `run_info.json`
//! (written at the start and end of a run), `samples.json` (written by `[generate_eval]`) and
//! `recipe.toml`; any of these may be missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Result, TrackError};

/// The largest input file read (a metrics file of a million steps is ~200 MB).
const MAX_INPUT_BYTES: u64 = 512 << 20;

/// One curve: its label and (step, value) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// The charts of a report: title and the log keys drawn on it.
const CHARTS: &[(&str, &[&str])] = &[
    ("Loss", &["loss", "eval_loss"]),
    ("Learning rate", &["learning_rate", "learning_rate_projector", "learning_rate_vision"]),
    ("Gradient norm", &["grad_norm"]),
    ("Mean token accuracy", &["mean_token_accuracy", "eval_mean_token_accuracy"]),
    ("Tokens per second", &["tokens_per_s"]),
];

/// An SVG line chart of `series` against the step.
pub fn line_chart(title: &str, series: &[Series]) -> std::result::Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in series.iter().flat_map(|s| s.points.iter()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        // A flat curve still gets a visible range.
        let pad = ((y1 - y0).abs() * 0.05).max(y1.abs() * 1e-3).max(1e-12);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("step").y_label_formatter(&|v| format_value(*v)).draw().map_err(|e| e.to_string())?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            // Points too, so that a curve of one or two evaluations is visible.
            if s.points.len() <= 50 {
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
            }
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn format_value(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

fn read_bounded(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrackError::io(path, e)),
    };
    let mut text = String::new();
    file.take(MAX_INPUT_BYTES + 1).read_to_string(&mut text).map_err(|e| TrackError::io(path, e))?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(TrackError::bad(path, format!("larger than {MAX_INPUT_BYTES} bytes")));
    }
    Ok(Some(text))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match read_bounded(path)? {
        Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| TrackError::bad(path, format!("not valid JSON: {e}"))),
        None => Ok(None),
    }
}

/// Every key's (step, value) points in `metrics.jsonl`; for a step logged twice (a resumed
/// run appends) the last value wins.
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let mut by_key: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for (i, line) in read_bounded(path)?.unwrap_or_default().lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| TrackError::bad(path, format!("line {}: not valid JSON: {e}", i + 1)))?;
        let Some(step) = v["step"].as_u64() else { continue };
        for (k, x) in v.as_object().into_iter().flatten() {
            if let (true, Some(x)) = (k != "step", x.as_f64()) {
                by_key.entry(k.clone()).or_default().insert(step, x);
            }
        }
    }
    Ok(by_key.into_iter().map(|(k, m)| (k, m.into_iter().map(|(s, v)| (s as f64, v)).collect())).collect())
}

/// One `[generate_eval]` answer, as `samples.json` holds it.
pub struct Sample {
    pub question: String,
    pub answer: String,
    pub expected: String,
    pub correct: bool,
    pub kind: String,
    /// The picture's encoded bytes (PNG, JPEG, GIF or WebP), shown inline.
    pub image: Option<Vec<u8>>,
}

fn image_mime(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        [0xFF, 0xD8, ..] => Some("image/jpeg"),
        [b'G', b'I', b'F', ..] => Some("image/gif"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("image/webp"),
        _ => None,
    }
}

/// Writes `output_dir/samples.json` (atomically): the samples and per-kind accuracy
/// (`kind → (right, total)`), for the report.
pub fn write_samples(output_dir: &Path, samples: &[Sample], accuracy: &BTreeMap<String, (usize, usize)>) -> Result<PathBuf> {
    let list: Vec<Value> = samples
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({"question": s.question, "answer": s.answer, "expected": s.expected, "correct": s.correct, "kind": s.kind});
            if let Some((bytes, mime)) = s.image.as_deref().and_then(|b| image_mime(b).map(|m| (b, m))) {
                v["image_mime"] = mime.into();
                v["image_base64"] = base64::engine::general_purpose::STANDARD.encode(bytes).into();
            }
            v
        })
        .collect();
    let acc: serde_json::Map<String, Value> = accuracy.iter().map(|(k, (r, t))| (k.clone(), serde_json::json!({"right": r, "total": t}))).collect();
    let path = output_dir.join("samples.json");
    let tmp = output_dir.join(".samples.json.tmp");
    std::fs::write(&tmp, serde_json::json!({"samples": list, "accuracy": acc}).to_string()).map_err(|e| TrackError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrackError::io(&path, e))?;
    Ok(path)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Writes `output_dir/report.html` (atomically) and returns its path.
pub fn write_report(output_dir: &Path) -> Result<PathBuf> {
    if !output_dir.is_dir() {
        return Err(TrackError::bad(output_dir, "not a directory (give a training output_dir)"));
    }
    let metrics = read_metrics(&output_dir.join("metrics.jsonl"))?;
    let info = read_json(&output_dir.join("run_info.json"))?.unwrap_or(Value::Null);
    let samples = read_json(&output_dir.join("samples.json"))?.unwrap_or(Value::Null);
    let recipe = read_bounded(&output_dir.join("recipe.toml"))?;

    let mut html = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vsft report</title><style>\
         body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}\
         h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}\
         .charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee}\
         table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}\
         .samples{display:flex;flex-wrap:wrap;gap:14px}.sample{width:260px;border:1px solid #ddd;padding:8px}\
         .sample img{width:100%;image-rendering:pixelated}.ok{color:#080}.bad{color:#b00}\
         pre{background:#f6f6f6;padding:10px;overflow:auto}</style></head><body>\n",
    );
    html.push_str(&format!("<h1>vsft run: {}</h1>\n", escape(&output_dir.display().to_string())));
    if let Some(summary) = info.get("summary").and_then(Value::as_str) {
        html.push_str(&format!("<p>{}</p>\n", escape(summary)));
    }

    html.push_str("<h2>Curves</h2>\n<div class=\"charts\">\n");
    let mut drawn = 0;
    for (title, keys) in CHARTS {
        let series: Vec<Series> = keys.iter().filter_map(|k| metrics.get(*k).map(|p| Series { label: k.to_string(), points: p.clone() })).filter(|s| !s.points.is_empty()).collect();
        if series.is_empty() {
            continue;
        }
        let svg = line_chart(title, &series).map_err(|e| TrackError::bad(output_dir, format!("drawing {title}: {e}")))?;
        html.push_str(&format!("<div class=\"chart\" data-chart=\"{}\">{svg}</div>\n", escape(title)));
        drawn += 1;
    }
    if drawn == 0 {
        html.push_str("<p>No metrics logged yet.</p>\n");
    }
    html.push_str("</div>\n");

    if let Some(groups) = info.get("groups").and_then(Value::as_array) {
        html.push_str("<h2>What trains</h2>\n<table><tr><th>part</th><th>trains</th><th>parameters</th><th>learning rate</th></tr>\n");
        for g in groups {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                escape(g["name"].as_str().unwrap_or("")),
                if g["trains"].as_bool().unwrap_or(false) { "yes" } else { "frozen" },
                g["params"].as_u64().unwrap_or(0),
                g["lr"].as_f64().map(|v| format!("{v:.2e}")).unwrap_or_default()
            ));
        }
        html.push_str("</table>\n");
    }

    html.push_str("<h2>Skipped rows</h2>\n");
    match info.get("skipped").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => html.push_str(&format!("<pre>{}</pre>\n", escape(s))),
        _ => html.push_str("<p>None.</p>\n"),
    }

    if let Some(list) = samples.get("samples").and_then(Value::as_array) {
        html.push_str("<h2>Sample answers</h2>\n");
        if let Some(acc) = samples.get("accuracy").and_then(Value::as_object) {
            html.push_str("<table><tr><th>questions</th><th>accuracy</th></tr>\n");
            for (kind, a) in acc {
                html.push_str(&format!("<tr><td>{}</td><td>{:.1} % ({}/{})</td></tr>\n", escape(kind), 100.0 * a["right"].as_f64().unwrap_or(0.0) / a["total"].as_f64().unwrap_or(1.0).max(1.0), a["right"], a["total"]));
            }
            html.push_str("</table>\n");
        }
        html.push_str("<div class=\"samples\">\n");
        for s in list {
            let img = match (s["image_mime"].as_str(), s["image_base64"].as_str()) {
                (Some(mime), Some(b64)) if base64::engine::general_purpose::STANDARD.decode(b64).is_ok() => format!("<img alt=\"\" src=\"data:{};base64,{b64}\">", escape(mime)),
                _ => String::new(),
            };
            let correct = s["correct"].as_bool().unwrap_or(false);
            html.push_str(&format!(
                "<div class=\"sample\">{img}<p><b>Q:</b> {}</p><p><b>A:</b> <span class=\"{}\">{}</span></p><p><b>Expected:</b> {}</p></div>\n",
                escape(s["question"].as_str().unwrap_or("")),
                if correct { "ok" } else { "bad" },
                escape(s["answer"].as_str().unwrap_or("")),
                escape(s["expected"].as_str().unwrap_or(""))
            ));
        }
        html.push_str("</div>\n");
    }

    if let Some(r) = recipe {
        html.push_str(&format!("<h2>Recipe</h2>\n<pre>{}</pre>\n", escape(&r)));
    }
    html.push_str("</body></html>\n");

    let path = output_dir.join("report.html");
    let tmp = output_dir.join(".report.html.tmp");
    std::fs::write(&tmp, html).map_err(|e| TrackError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| TrackError::io(&path, e))?;
    Ok(path)
}
