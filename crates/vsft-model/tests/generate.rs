//! Greedy generation with the KV cache equals transformers' `generate` token for token
//! (fixtures from scripts/make_model_fixtures.py).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use vsft_model::generate::GenerateOptions;
use vsft_model::weights::{read_tensor_file, RawTensor};
use vsft_model::VlmModel;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model").join(name)
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in ["tiny-llava-mha", "tiny-llava-gqa"] {
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("generate.json")).unwrap()).unwrap();
        let prompt: Vec<i64> = want["prompt"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let model = VlmModel::<Flex>::load(&fixture(name).join("legacy"), &Default::default()).unwrap();
        let r = read_tensor_file(&fixture(name).join("reference.safetensors")).unwrap();
        let p = &r["pixel_values"];
        let per: usize = p.shape[1..].iter().product();
        let first = RawTensor::from_f32([&[1], &p.shape[1..]].concat(), &p.to_f32().unwrap()[..per]);
        let images = model.images_from_hf(&first, None).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: want["max_new_tokens"].as_u64().unwrap() as usize,
            eos_token_ids: vec![want["eos_token_id"].as_i64().unwrap()],
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let got = model.as_dyn().generate(&prompt, Some(&images.inputs()), &opts, &mut |t| {
            streamed.push(t);
            true
        })
        .unwrap();
        let expected: Vec<i64> = want["new_tokens"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        println!("{name}: {got:?}");
        assert_eq!(got, expected, "{name}: greedy tokens differ from transformers");
        assert_eq!(streamed.len(), got.len() - usize::from(opts.eos_token_ids.contains(got.last().unwrap())));
    }
}
