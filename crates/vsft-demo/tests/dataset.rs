//! The shapes dataset: deterministic, readable by vsft-data, every row processable with the
//! demo model files, answers balanced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vsft_data::{open_dataset, CollatorConfig, LabelMask, Processor};
use vsft_demo::{held_out_questions, pre_tokenize, write_demo_model_files, write_shapes_dataset, Colour, QuestionKind, Shape, ShapesSpec};

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsft-demo").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small(seed: u64) -> ShapesSpec {
    ShapesSpec { seed, n_captions: 60, n_qa_train: 80, n_qa_test: 25, row_group_size: 32, ..ShapesSpec::default() }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = write_shapes_dataset(&tmp("det-a"), &small(7)).unwrap();
    let b = write_shapes_dataset(&tmp("det-b"), &small(7)).unwrap();
    let c = write_shapes_dataset(&tmp("det-c"), &small(8)).unwrap();
    for (x, y, z) in [(&a.captions_train, &b.captions_train, &c.captions_train), (&a.qa_train, &b.qa_train, &c.qa_train), (&a.qa_test, &b.qa_test, &c.qa_test)] {
        assert_eq!(read(x), read(y), "{} differs between two runs with the same seed", x.display());
        assert_ne!(read(x), read(z), "{}: another seed gives the same file", x.display());
    }
    // Splits have their own streams: changing the caption count leaves QA unchanged.
    let d = write_shapes_dataset(&tmp("det-d"), &ShapesSpec { n_captions: 10, ..small(7) }).unwrap();
    assert_eq!(read(&a.qa_train), read(&d.qa_train));
    assert_eq!(read(&a.qa_test), read(&d.qa_test));
}

#[test]
fn hub_layout_opens_with_vsft_data() {
    let root = tmp("layout");
    let spec = small(1);
    let f = write_shapes_dataset(&root, &spec).unwrap();
    assert_eq!(f.captions_train, root.join("captions/data/train-00000-of-00001.parquet"));
    assert_eq!(f.qa_train, root.join("qa/data/train-00000-of-00001.parquet"));
    assert_eq!(f.qa_test, root.join("qa/data/test-00000-of-00001.parquet"));
    let s = |p: &Path| p.to_string_lossy().to_string();
    assert_eq!(open_dataset(&s(&f.captions_dir), None, None).unwrap().len(), spec.n_captions);
    assert_eq!(open_dataset(&s(&f.captions_dir), Some("train"), None).unwrap().len(), spec.n_captions);
    assert_eq!(open_dataset(&s(&f.qa_dir), None, None).unwrap().len(), spec.n_qa_train, "the default split is train");
    assert_eq!(open_dataset(&s(&f.qa_dir), Some("train"), None).unwrap().len(), spec.n_qa_train);
    let test = open_dataset(&s(&f.qa_dir), Some("test"), None).unwrap();
    assert_eq!(test.len(), spec.n_qa_test);
    assert_eq!(test.groups().len(), 1);
    let train = open_dataset(&s(&f.qa_dir), Some("train"), None).unwrap();
    assert_eq!(train.groups().len(), 3, "80 rows in groups of 32");
}

/// The default-sized dataset: every row of every split processes with the demo model files
/// (assistant label mask non-empty, one image of 36 tokens, no `<unk>`).
#[test]
fn every_row_processes_with_the_demo_model_files() {
    let root = tmp("full");
    let model = root.join("model");
    let v = write_demo_model_files(&model).unwrap();
    let spec = ShapesSpec::default();
    let f = write_shapes_dataset(&root.join("data"), &spec).unwrap();
    let proc = Processor::from_model_dir(&model, None).unwrap();
    assert_eq!(proc.text.image_token_id, v.image_token_id);
    assert_eq!(proc.text.pad_token_id, v.pad_token_id);
    assert_eq!(proc.text.image.image_seq_length, 36);
    let cfg = CollatorConfig { label_mask: LabelMask::Assistant, ..CollatorConfig::default() };
    let mut max_len = 0;
    for (file, n) in [(&f.captions_train, spec.n_captions), (&f.qa_train, spec.n_qa_train), (&f.qa_test, spec.n_qa_test)] {
        let mut src = open_dataset(&file.to_string_lossy(), None, None).unwrap();
        assert_eq!(src.len(), n);
        for i in 0..src.len() {
            let row = src.get(i).unwrap();
            let ex = proc.process_row(&row, &cfg).unwrap_or_else(|e| panic!("{}: row {i}: {e}", file.display()));
            let ids = &ex.encoded.input_ids;
            assert_eq!(ids[0], v.bos_token_id);
            assert!(!ids.contains(&v.unk_token_id), "row {i}: <unk> in {:?}", ex.encoded.text);
            assert_eq!(ex.encoded.image_spans, vec![(3, 3 + 36)], "<s> USER : <image>...");
            let mask = ex.encoded.assistant_mask.as_ref().unwrap();
            let n_turns = row.messages.len() / 2;
            // Exactly the answers' words and one </s> each.
            let answer_tokens: usize =
                row.messages.iter().filter(|m| m.role == "assistant").map(|m| pre_tokenize(m.content[0].text.as_deref().unwrap()).len() + 1).sum();
            assert_eq!(mask.iter().filter(|&&m| m).count(), answer_tokens, "row {i}: {:?}", ex.encoded.text);
            assert_eq!(ids.iter().filter(|&&t| t == v.eos_token_id).count(), n_turns);
            assert_eq!(ex.images.n_images(), 1);
            max_len = max_len.max(ids.len());
        }
    }
    // Captions are longer than answers; the whole thing stays short for a CPU demo.
    assert!(max_len <= 96, "longest example {max_len} tokens");
}

#[test]
fn answers_are_balanced() {
    let root = tmp("balance");
    let spec = ShapesSpec { n_captions: 10, ..ShapesSpec::default() };
    let f = write_shapes_dataset(&root, &spec).unwrap();
    let mut src = open_dataset(&f.qa_train.to_string_lossy(), None, None).unwrap();
    let mut by_kind: BTreeMap<QuestionKind, BTreeMap<String, usize>> = BTreeMap::new();
    for i in 0..src.len() {
        let row = src.get(i).unwrap();
        for pair in row.messages.chunks(2) {
            let q = pair[0].content.iter().find(|c| c.kind == "text").unwrap().text.clone().unwrap();
            let a = pair[1].content[0].text.clone().unwrap();
            let kind = QuestionKind::of_question(&q).unwrap_or_else(|| panic!("unknown question {q:?}"));
            *by_kind.entry(kind).or_default().entry(a).or_default() += 1;
        }
    }
    let totals: Vec<usize> = QuestionKind::ALL.iter().map(|k| by_kind[k].values().sum()).collect();
    let mean = totals.iter().sum::<usize>() as f64 / totals.len() as f64;
    for (k, t) in QuestionKind::ALL.iter().zip(&totals) {
        assert!((*t as f64 - mean).abs() < 0.15 * mean, "{k:?}: {t} questions, mean {mean}");
    }
    let check = |kind: QuestionKind, answers: Vec<String>| {
        let counts = &by_kind[&kind];
        assert_eq!(counts.len(), answers.len(), "{kind:?}: {counts:?}");
        let mean = counts.values().sum::<usize>() as f64 / answers.len() as f64;
        for a in answers {
            let n = counts.get(&a).copied().unwrap_or(0) as f64;
            assert!((n - mean).abs() < 0.25 * mean, "{kind:?}: {a:?} {n} times, mean {mean}: {counts:?}");
        }
    };
    let colours: Vec<String> = Colour::ALL.iter().map(|c| format!("{}.", c.name())).collect();
    let shapes: Vec<String> = Shape::ALL.iter().map(|s| format!("{}.", s.name())).collect();
    check(QuestionKind::Colour, colours.clone());
    check(QuestionKind::ColourAt, colours);
    check(QuestionKind::Shape, shapes);
    check(QuestionKind::Place, ["left.", "right.", "top.", "bottom."].map(String::from).to_vec());
    check(QuestionKind::Count, ["one.", "two."].map(String::from).to_vec());
}

#[test]
fn held_out_questions_read_back() {
    let root = tmp("heldout");
    let spec = ShapesSpec { n_captions: 5, n_qa_train: 5, n_qa_test: 50, ..ShapesSpec::default() };
    write_shapes_dataset(&root, &spec).unwrap();
    let qs = held_out_questions(&root).unwrap();
    assert_eq!(qs.len(), 50);
    for k in QuestionKind::ALL {
        assert_eq!(qs.iter().filter(|q| q.kind == k).count(), 10, "{k:?}");
    }
    for q in &qs {
        assert!(q.image_png.starts_with(b"\x89PNG"));
        assert!(q.question.ends_with('?'));
        assert!(q.answer.ends_with('.') && !q.answer.contains(' '), "{:?}", q.answer);
        assert!(q.is_correct(&q.answer));
        assert!(q.is_correct(&format!("{} and more", q.answer.to_uppercase())));
        assert!(!q.is_correct(""));
        assert!(!q.is_correct("purplish."));
    }
    assert!(held_out_questions(&root.join("nowhere")).unwrap_err().to_string().contains("nowhere"));
    // Scoring: the right answers score 100%, "red" everywhere scores the red answers only.
    let right: Vec<&str> = qs.iter().map(|q| q.answer.as_str()).collect();
    let s = vsft_demo::Score::new(&qs, &right);
    assert_eq!(s.overall(), 1.0);
    assert_eq!(s.to_string().matches("(100%)").count(), 6, "{s}");
    let red = vsft_demo::Score::new(&qs, &vec!["red."; qs.len()]);
    let n_red = qs.iter().filter(|q| q.answer == "red.").count();
    assert_eq!(red.overall(), n_red as f64 / qs.len() as f64);
    assert_eq!(red.of(QuestionKind::Count), Some(0.0));
}

/// The pictures hold what the text says: sample the pixel at each object's centre.
#[test]
fn pictures_match_their_scenes() {
    let mut rng = vsft_demo::SplitMix64::new(3);
    for _ in 0..500 {
        let scene = vsft_demo::Scene::random(&mut rng, 84);
        let px = scene.render();
        for o in &scene.objects {
            let (x, y) = (o.cx as usize, o.cy as usize);
            let p = &px[(y * 84 + x) * 3..][..3];
            assert_eq!(p, o.rgb, "{o:?}");
            assert!(o.cx - o.r >= 0.0 && o.cx + o.r <= 84.0 && o.cy - 1.05 * o.r >= 0.0 && o.cy + o.r <= 84.0, "{o:?} leaves the picture");
        }
        if scene.objects.len() == 2 {
            let (a, b) = (&scene.objects[0], &scene.objects[1]);
            assert_ne!(a.shape, b.shape);
            assert_ne!(a.colour, b.colour);
            // The two never touch: every sample point is covered by one object at most.
            for y in 0..4 * 84 {
                for x in 0..4 * 84 {
                    let (fx, fy) = (x as f32 / 4.0, y as f32 / 4.0);
                    assert!(!(vsft_demo::Scene::covers(a, fx, fy) && vsft_demo::Scene::covers(b, fx, fy)), "{a:?} and {b:?} overlap");
                }
            }
        }
        let img = image::load_from_memory(&scene.png().unwrap()).unwrap().to_rgb8();
        assert_eq!(img.into_raw(), px);
    }
}

#[test]
fn kinds_can_be_restricted_and_bad_specs_are_refused() {
    let root = tmp("kinds");
    let spec = ShapesSpec { n_captions: 5, n_qa_train: 40, n_qa_test: 12, kinds: vec![QuestionKind::Colour, QuestionKind::Count], ..ShapesSpec::default() };
    let f = write_shapes_dataset(&root, &spec).unwrap();
    let qs = held_out_questions(&root).unwrap();
    assert_eq!(qs.iter().filter(|q| q.kind == QuestionKind::Colour).count(), 6);
    assert_eq!(qs.iter().filter(|q| q.kind == QuestionKind::Count).count(), 6);
    let mut src = open_dataset(&f.qa_train.to_string_lossy(), None, None).unwrap();
    for i in 0..src.len() {
        for m in src.get(i).unwrap().messages.iter().filter(|m| m.role == "user") {
            let q = m.content.iter().find(|c| c.kind == "text").unwrap().text.clone().unwrap();
            assert!(matches!(QuestionKind::of_question(&q), Some(QuestionKind::Colour | QuestionKind::Count)), "{q}");
        }
    }
    for bad in [
        ShapesSpec { kinds: vec![], ..ShapesSpec::default() },
        ShapesSpec { max_turns: 0, ..ShapesSpec::default() },
        ShapesSpec { geometry: vsft_demo::Geometry { min_size: 0.3, max_size: 0.2, ..Default::default() }, ..ShapesSpec::default() },
    ] {
        let e = write_shapes_dataset(&root.join("bad"), &bad).unwrap_err().to_string();
        assert!(e.contains("bad ShapesSpec") && e.contains("bad"), "{e}");
    }
}
