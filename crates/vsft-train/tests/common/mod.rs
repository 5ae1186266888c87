//! Helpers the integration tests share: the fixture directory and batches from
//! `tests/fixtures/train/stage1_batches.safetensors`.

use std::path::{Path, PathBuf};

use vsft_data::Batch;
use vsft_model::weights::RawTensor;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Rows `rows` of fixture batch `i`; `unpad` trims to the longest row.
pub fn batch_from(t: &std::collections::BTreeMap<String, RawTensor>, i: usize, rows: std::ops::Range<usize>, unpad: bool) -> Batch {
    let ids = &t[&format!("batch{i}.input_ids")];
    let (bsz, seq) = (ids.shape[0], ids.shape[1]);
    let ids = ids.to_i64().unwrap();
    let mask = t[&format!("batch{i}.attention_mask")].to_i64().unwrap();
    let labels = t[&format!("batch{i}.labels")].to_i64().unwrap();
    let pix = &t[&format!("batch{i}.pixel_values")];
    let per_image: usize = pix.shape[1..].iter().product();
    let pix = pix.to_f32().unwrap();
    assert!(rows.end <= bsz);
    let width = if unpad { rows.clone().map(|r| mask[r * seq..(r + 1) * seq].iter().sum::<i64>() as usize).max().unwrap() } else { seq };
    let take = |v: &Vec<i64>| rows.clone().flat_map(|r| v[r * seq..r * seq + width].to_vec()).collect::<Vec<i64>>();
    let labels_v = take(&labels);
    let n_label_tokens = labels_v.iter().filter(|&&l| l != -100).count();
    Batch {
        batch_size: rows.len(),
        seq_len: width,
        input_ids: take(&ids),
        attention_mask: take(&mask),
        labels: labels_v,
        pixel_values: rows.clone().flat_map(|r| pix[r * per_image..(r + 1) * per_image].to_vec()).collect(),
        n_images: rows.len(),
        image_hw: (t[&format!("batch{i}.pixel_values")].shape[2], t[&format!("batch{i}.pixel_values")].shape[3]),
        rows: rows.collect(),
        n_label_tokens,
        all_labels_masked: n_label_tokens == 0,
    }
}
