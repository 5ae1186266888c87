//! The fused CPU kernels (vsft-kernels) against Burn's composed ops on the same model: logits,
//! loss, and the gradients of every trainable tensor (projector, LoRA A and B on all seven
//! projections), with grouped-query heads, head_dim 24, LoRA, and left padding that leaves
//! query rows with no visible key. The composed path is the one the transformers parity tests
//! (parity.rs) established; this test is its own binary because it flips a process-wide switch.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use vsft_model::lora::LoraConfig;
use vsft_model::loss::causal_lm_loss;
use vsft_model::weights::read_tensor_file;
use vsft_model::{ImageInfo, ImageInputs, VlmModel};

type Train = Autodiff<Flex>;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model").join(name)
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

struct Run {
    logits: Vec<f32>,
    loss: f32,
    grads: Vec<(String, Vec<f32>)>,
}

/// One forward + backward; LoRA B is random (PEFT starts it at zero, which would hide A's gradient).
fn run(name: &str) -> Run {
    let dev = Default::default();
    let r = read_tensor_file(&fixture_dir(name).join("reference.safetensors")).unwrap();
    let mut model = VlmModel::<Train>::load(&fixture_dir(name).join("legacy"), &dev).unwrap();
    let lora = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..Default::default() };
    model.add_lora(&lora, 7).unwrap();
    <Train as Backend>::seed(&dev, 11);
    for (_, linear) in model.as_dyn_mut().linears_mut() {
        let Some(l) = linear.lora.as_mut() else { continue };
        let shape = l.lora_b.val().dims();
        l.lora_b = Param::from_tensor(Tensor::random(shape, Distribution::Normal(0.0, 0.05), &dev));
    }
    let ids = &r["input_ids"];
    let (batch, seq) = (ids.shape[0], ids.shape[1]);
    let int = |v: Vec<i64>| Tensor::<Train, 2, Int>::from_data(TensorData::new(v, [batch, seq]), &dev);
    // Left-pad the last row by three positions: those queries see no key at all.
    let mut mask = r["attention_mask"].to_i64().unwrap();
    mask[(batch - 1) * seq..(batch - 1) * seq + 3].fill(0);
    let p = &r["pixel_values"];
    let pixels = p.to_f32().unwrap();
    let infos = vec![ImageInfo { original_hw: (p.shape[2], p.shape[3]), units: 1, grid: (1, 1, 1) }; p.shape[0]];
    let images = ImageInputs { pixel_values: &pixels, shape: &p.shape, images: &infos };
    let projected = model.image_features_for_training(&images, false).unwrap();
    let logits = model.as_dyn().forward_with_features(int(ids.to_i64().unwrap()), int(mask), Some(projected), &Default::default()).unwrap();
    let loss = causal_lm_loss(logits.clone(), int(r["labels"].to_i64().unwrap()));
    let loss_value = values(loss.mean())[0];
    let grads = loss.mean().backward();
    let mut out = Vec::new();
    let VlmModel::Llava(llava) = &model else { panic!("a LLaVA fixture") };
    let p = &llava.multi_modal_projector;
    out.push(("projector.linear_1.weight".to_string(), values(p.linear_1.weight.val().grad(&grads).unwrap())));
    out.push(("projector.linear_2.bias".to_string(), values(p.linear_2.bias.as_ref().unwrap().val().grad(&grads).unwrap())));
    for (name, linear) in model.as_dyn_mut().linears_mut() {
        let Some(l) = linear.lora.as_ref() else { continue };
        out.push((format!("{name}.lora_A"), values(l.lora_a.val().grad(&grads).unwrap())));
        out.push((format!("{name}.lora_B"), values(l.lora_b.val().grad(&grads).unwrap())));
    }
    Run { logits: values(logits), loss: loss_value, grads: out }
}

#[test]
fn fused_kernels_match_burns_composed_ops() {
    for name in ["tiny-llava-gqa", "tiny-llava-mha"] {
        vsft_kernels::set_enabled(true);
        let calls = vsft_kernels::fused_calls();
        let fused = run(name);
        assert!(vsft_kernels::fused_calls() > calls, "the fused kernels did not run");
        vsft_kernels::set_enabled(false);
        let calls = vsft_kernels::fused_calls();
        let composed = run(name);
        assert_eq!(vsft_kernels::fused_calls(), calls, "the switch did not turn the kernels off");
        vsft_kernels::set_enabled(true);

        let logits = rel_diff(&fused.logits, &composed.logits);
        let loss = ((fused.loss - composed.loss) / composed.loss).abs();
        println!("{name}: logits rel diff {logits:.2e}, loss rel diff {loss:.2e}");
        assert!(logits <= 1e-5, "{name}: logits differ by {logits}");
        assert!(loss <= 1e-5, "{name}: loss differs by {loss}");
        let mut worst = (0f32, String::new());
        for ((n, f), (_, c)) in fused.grads.iter().zip(&composed.grads) {
            let d = rel_diff(f, c);
            assert!(c.iter().any(|&v| v != 0.0), "{name}: {n}'s gradient is zero: the test would prove nothing");
            assert!(d <= 1e-4, "{name}: gradient of {n} differs by {d}");
            if d > worst.0 {
                worst = (d, n.clone());
            }
        }
        println!("{name}: {} gradients, worst rel diff {:.2e} ({})", fused.grads.len(), worst.0, worst.1);
    }
}
