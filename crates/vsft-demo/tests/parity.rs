//! The demo files mean the same to vsft-data as to transformers' `LlavaProcessor`: rendered
//! text, input ids (BOS, `<image>` expanded to 36), assistant mask and pixels equal
//! tests/fixtures/transformers.json (made by tests/transformers_parity.py).

use std::path::Path;

use vsft_data::{open_dataset, CollatorConfig, LabelMask, Processor};
use vsft_demo::{write_demo_model_files, write_shapes_dataset, ShapesSpec};

#[test]
fn matches_transformers() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsft-demo/parity");
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    let v = write_demo_model_files(&model).unwrap();
    let files = write_shapes_dataset(&root.join("data"), &ShapesSpec::default()).unwrap();
    let p = Processor::from_model_dir(&model, None).unwrap();
    let cfg = CollatorConfig { label_mask: LabelMask::Assistant, ..CollatorConfig::default() };
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformers.json")).unwrap()).unwrap();
    let rows = fixture.as_array().unwrap();
    assert_eq!(rows.len(), 9);
    for want in rows {
        let file = match (want["dataset"].as_str().unwrap(), want["split"].as_str().unwrap()) {
            ("captions", _) => &files.captions_train,
            (_, "train") => &files.qa_train,
            _ => &files.qa_test,
        };
        let i = want["row"].as_u64().unwrap() as usize;
        let row = open_dataset(&file.to_string_lossy(), None, None).unwrap().get(i).unwrap();
        let ex = p.process_row(&row, &cfg).unwrap();
        let at = format!("{} row {i}", file.display());
        assert_eq!(ex.encoded.text, want["text"].as_str().unwrap(), "{at}");
        let ids: Vec<u32> = want["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ex.encoded.input_ids, ids, "{at}");
        // transformers' mask is over the tokens without BOS and with <image> once.
        let mask = ex.encoded.assistant_mask.as_ref().unwrap();
        let mut ours = Vec::new();
        for (k, (&t, &m)) in ex.encoded.input_ids.iter().zip(mask).enumerate() {
            if k == 0 || (t == v.image_token_id && ex.encoded.input_ids[k - 1] == v.image_token_id) {
                continue;
            }
            ours.push(m as u64);
        }
        let theirs: Vec<u64> = want["assistant_masks"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(ours, theirs, "{at}");
        let px = ex.images.image_pixels(0);
        let sum: f64 = px.iter().map(|&x| x as f64).sum();
        let want_sum = want["pixel_sum"].as_f64().unwrap();
        assert!((sum - want_sum).abs() < 1e-6 * px.len() as f64, "{at}: pixel sum {sum} vs {want_sum}");
        for (a, b) in px.iter().zip(want["pixel_first"].as_array().unwrap()) {
            assert!((*a as f64 - b.as_f64().unwrap()).abs() < 1e-5, "{at}: {a} vs {b}");
        }
        let prompt = p.text.render(&row.messages[..1], true).unwrap().text;
        assert_eq!(prompt, want["generation_prompt"].as_str().unwrap(), "{at}");
    }
}
