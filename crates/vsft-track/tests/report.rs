//! `report.html` from a real run's metrics (the TensorBoard fixture's metrics.jsonl), a stage
//! report, skipped rows and sample answers: the page holds a chart per metric with every logged
//! point, the tables, the pictures inline, and nothing that reaches the network.

use std::collections::BTreeMap;
use std::path::Path;

use vsft_track::report::{read_metrics, write_report, write_samples, Sample};

#[test]
fn the_report_holds_curves_tables_and_samples_and_needs_no_network() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures.join("tensorboard/metrics.jsonl"), dir.join("metrics.jsonl")).unwrap();
    std::fs::write(dir.join("recipe.toml"), "[train]\nstage = \"instruct\"\nlr = 1e-3 # <not markup>\n").unwrap();
    std::fs::write(
        dir.join("run_info.json"),
        r#"{"summary": "stage Instruct", "groups": [{"name": "projector", "trains": true, "params": 2112, "lr": 0.001}, {"name": "vision tower", "trains": false, "params": 37248, "lr": null}], "skipped": "corrupt image: 2 rows (a.parquet rows 4, 17)"}"#,
    )
    .unwrap();
    let png = std::fs::read(fixtures.join("data/images/small.png")).unwrap();
    let samples = [
        Sample { question: "What colour is the circle?".into(), answer: "red".into(), expected: "red".into(), correct: true, kind: "colour".into(), image: Some(png.clone()) },
        Sample { question: "How many shapes?".into(), answer: "two".into(), expected: "three".into(), correct: false, kind: "count".into(), image: Some(png.clone()) },
    ];
    let accuracy: BTreeMap<String, (usize, usize)> = [("colour".to_string(), (1, 1)), ("count".to_string(), (0, 1))].into();
    write_samples(&dir, &samples, &accuracy).unwrap();

    let html = std::fs::read_to_string(write_report(&dir).unwrap()).unwrap();
    let metrics = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    for (title, key) in [("Loss", "loss"), ("Learning rate", "learning_rate"), ("Gradient norm", "grad_norm"), ("Mean token accuracy", "mean_token_accuracy")] {
        let start = html.find(&format!("data-chart=\"{title}\"")).unwrap_or_else(|| panic!("no {title} chart"));
        let chart = &html[start..start + html[start..].find("</div>").unwrap()];
        assert!(chart.contains("<svg"), "{title} is an inline SVG");
        // The first curve (curves are drawn 2 px wide, axes 1 px) is `key`: a point per logged step.
        let points = chart.split("stroke-width=\"2\" points=\"").nth(1).unwrap().split('"').next().unwrap().split_whitespace().count();
        assert_eq!(points, metrics[key].len(), "{title}: points of {key}");
    }
    let eval_points = metrics["eval_loss"].len();
    assert!(eval_points >= 2 && html.contains(">\neval_loss\n<"), "eval loss drawn and labelled");
    assert!(html.contains("<td>projector</td><td>yes</td><td>2112</td>") && html.contains("<td>vision tower</td><td>frozen</td>"));
    assert!(html.contains("corrupt image: 2 rows (a.parquet rows 4, 17)"));
    assert_eq!(html.matches("<img alt=\"\" src=\"data:image/png;base64,").count(), 2, "both pictures inline");
    assert!(html.contains("How many shapes?") && html.contains("<span class=\"bad\">two</span>") && html.contains("<b>Expected:</b> three"));
    assert!(html.contains("1e-3 # &lt;not markup&gt;"), "the recipe is escaped");
    assert!(!html.contains("<script"), "no scripts");
    let outside: Vec<&str> = html.match_indices("http").map(|(i, _)| &html[i..(i + 40).min(html.len())]).filter(|s| !s.starts_with("http://www.w3.org/")).collect();
    assert!(outside.is_empty(), "nothing fetched from the network: {outside:?}");
}
