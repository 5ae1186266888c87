//! What the parity tests share: fixture paths, tensor values, differences, per-parameter
//! gradients by tensor name.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use vsft_model::weights::{read_tensor_file, ModulePath, RawTensor};

pub type Train = Autodiff<Flex>;

/// `tests/fixtures/<rel>`.
pub fn fixtures(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(rel)
}

/// A fixture's safetensors file; the message says which script writes it.
pub fn tensors(path: &Path) -> BTreeMap<String, RawTensor> {
    read_tensor_file(path).unwrap_or_else(|e| panic!("{e} (run the fixture script in scripts/)"))
}

pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Max abs difference relative to the largest reference value.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    max_abs_diff(a, b) / b.iter().map(|x| x.abs()).fold(0.0, f32::max).max(1e-12)
}

/// Every parameter's gradient (flattened) by tensor name, of any module.
pub fn param_grads<M: burn::module::Module<Train>>(module: &M, grads: &<Train as AutodiffBackend>::Gradients) -> Vec<(String, Option<Vec<f32>>)> {
    struct Grads<'a> {
        path: ModulePath,
        grads: &'a <Train as AutodiffBackend>::Gradients,
        out: Vec<(String, Option<Vec<f32>>)>,
    }
    impl burn::module::ModuleVisitor<Train> for Grads<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Train, D>>) {
            self.out.push((self.path.join(), param.val().grad(self.grads).map(values)));
        }
    }
    let mut v = Grads { path: ModulePath::default(), grads, out: Vec::new() };
    module.visit(&mut v);
    v.out
}

// ---------------------------------------------------------------------------------------------
// The LLaVA-1.5 checks, generic over the backend: the CPU tests (parity.rs, generate.rs,
// lora.rs) run them on Flex with `factor` 1, and vsft-train's backend suite (tests/backends.rs)
// on wgpu / CUDA with a looser factor (at most 10). Each returns what it measured.

use burn::tensor::{Int, TensorData};
use vsft_model::loss::causal_lm_loss;
use vsft_model::{HfImages, VlmModel};

/// The two tiny LLaVA-1.5 configs of scripts/make_model_fixtures.py.
pub const CONFIGS: [&str; 2] = ["tiny-llava-mha", "tiny-llava-gqa"];
/// The CPU thresholds against transformers / PEFT.
pub const LOGITS_ABS: f32 = 1e-4;
pub const LOSS_REL: f32 = 1e-5;
pub const GRAD_REL: f32 = 1e-4;
pub const LORA_LOGITS_ABS: f32 = 1e-5;
pub const MERGED_LOGITS_ABS: f32 = 1e-4;

/// `tests/fixtures/model/<name>`.
pub fn model_dir(name: &str) -> PathBuf {
    fixtures("model").join(name)
}

/// The fixture's `reference.safetensors` (inputs and transformers' outputs).
pub fn reference(name: &str) -> BTreeMap<String, RawTensor> {
    tensors(&model_dir(name).join("reference.safetensors"))
}

pub struct Inputs<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2, Int>,
    /// Absent from the LoRA fixtures, which hold logits only.
    pub labels: Option<Tensor<B, 2, Int>>,
    pub pixel_values: RawTensor,
}

pub fn inputs<B: Backend>(r: &BTreeMap<String, RawTensor>) -> Inputs<B> {
    let dev = Default::default();
    let int = |k: &str| {
        let t = &r[k];
        Tensor::<B, 2, Int>::from_data(TensorData::new(t.to_i64().unwrap(), [t.shape[0], t.shape[1]]), &dev)
    };
    Inputs { input_ids: int("input_ids"), attention_mask: int("attention_mask"), labels: r.contains_key("labels").then(|| int("labels")), pixel_values: r["pixel_values"].clone() }
}

pub fn images<B: Backend>(model: &VlmModel<B>, x: &Inputs<B>) -> HfImages {
    model.images_from_hf(&x.pixel_values, None).unwrap()
}

pub fn logits_of<B: Backend>(model: &VlmModel<B>, x: &Inputs<B>) -> Vec<f32> {
    let logits = model
        .as_dyn()
        .forward(x.input_ids.clone(), x.attention_mask.clone(), Some(&images(model, x).inputs()))
        .unwrap();
    values(logits)
}

pub fn llava<B: Backend>(model: &VlmModel<B>) -> &vsft_model::LlavaModel<B> {
    match model {
        VlmModel::Llava(m) => m,
        _ => panic!("a LLaVA fixture"),
    }
}

/// Logits of the model in key layout `layout` against transformers': max abs difference.
pub fn check_logits<B: Backend>(name: &str, layout: &str, factor: f32) -> f32 {
    let r = reference(name);
    let x = inputs::<B>(&r);
    let model = VlmModel::<B>::load(&model_dir(name).join(layout), &Default::default()).unwrap();
    let diff = max_abs_diff(&logits_of(&model, &x), &r["logits"].to_f32().unwrap());
    println!("{name}/{layout}: logits max abs diff {diff:.3e} (limit {:.0e})", LOGITS_ABS * factor);
    assert!(diff <= LOGITS_ABS * factor, "{name}/{layout}: logits differ by {diff}");
    diff
}

/// The label-token-mean loss and its summed form against transformers': relative differences.
pub fn check_loss<B: Backend>(name: &str, factor: f32) -> (f32, f32) {
    let r = reference(name);
    let x = inputs::<B>(&r);
    let model = VlmModel::<B>::load(&model_dir(name).join("legacy"), &Default::default()).unwrap();
    let imgs = images(&model, &x);
    let logits = model.as_dyn().forward(x.input_ids, x.attention_mask, Some(&imgs.inputs())).unwrap();
    let loss = causal_lm_loss(logits, x.labels.unwrap());
    assert_eq!(loss.label_tokens as i64, r["label_tokens"].to_i64().unwrap()[0]);
    let mean = values(loss.mean())[0];
    let want = r["loss"].to_f32().unwrap()[0];
    let rel = ((mean - want) / want).abs();
    let want_sum = r["loss_sum"].to_f32().unwrap()[0];
    let sum_rel = ((values(loss.sum.clone())[0] - want_sum) / want_sum).abs();
    println!("{name}: loss {mean} vs {want}: relative diff {rel:.3e}; summed form {sum_rel:.3e} (limit {:.0e})", LOSS_REL * factor);
    assert!(rel <= LOSS_REL * factor, "{name}: loss relative diff {rel}");
    assert!(sum_rel <= LOSS_REL * factor, "{name}: summed loss relative diff {sum_rel}");
    (rel, sum_rel)
}

/// The projector's four gradients against torch autograd's: the largest relative difference.
/// The frozen vision tower must have built no graph.
pub fn check_projector_grads<B: AutodiffBackend>(name: &str, factor: f32) -> f32 {
    let r = reference(name);
    let x = inputs::<B>(&r);
    let model = VlmModel::<B>::load(&model_dir(name).join("legacy"), &Default::default()).unwrap();
    let imgs = images(&model, &x);
    let projected = model.image_features_for_training(&imgs.inputs(), false).unwrap();
    let logits = model.as_dyn().forward_with_features(x.input_ids, x.attention_mask, Some(projected), &Default::default()).unwrap();
    let grads = causal_lm_loss(logits, x.labels.unwrap()).mean().backward();
    let p = &llava(&model).multi_modal_projector;
    let got = [
        ("linear_1.weight", values(p.linear_1.weight.val().grad(&grads).unwrap())),
        ("linear_1.bias", values(p.linear_1.bias.as_ref().unwrap().val().grad(&grads).unwrap())),
        ("linear_2.weight", values(p.linear_2.weight.val().grad(&grads).unwrap())),
        ("linear_2.bias", values(p.linear_2.bias.as_ref().unwrap().val().grad(&grads).unwrap())),
    ];
    let mut worst = 0.0f32;
    for (param, g) in got {
        let rel = rel_diff(&g, &r[&format!("grad.multi_modal_projector.{param}")].to_f32().unwrap());
        println!("{name}: grad {param} relative diff {rel:.3e} (limit {:.0e})", GRAD_REL * factor);
        assert!(rel <= GRAD_REL * factor, "{name}: gradient of {param} differs: {rel}");
        worst = worst.max(rel);
    }
    let patch = llava(&model).vision_tower.vision_model.embeddings.patch_embedding.weight.val();
    assert!(patch.grad(&grads).is_none(), "the vision tower must not be in the autodiff graph");
    worst
}

/// Greedy generation with the KV cache against transformers' `generate`: the same tokens.
pub fn check_greedy_generation<B: Backend>(name: &str) -> Vec<i64> {
    use vsft_model::generate::GenerateOptions;
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("generate.json")).unwrap()).unwrap();
    let ints = |k: &str| -> Vec<i64> { want[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
    let model = VlmModel::<B>::load(&model_dir(name).join("legacy"), &Default::default()).unwrap();
    let p = &reference(name)["pixel_values"];
    let per: usize = p.shape[1..].iter().product();
    let first = RawTensor::from_f32([&[1], &p.shape[1..]].concat(), &p.to_f32().unwrap()[..per]);
    let images = model.images_from_hf(&first, None).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: want["max_new_tokens"].as_u64().unwrap() as usize,
        eos_token_ids: vec![want["eos_token_id"].as_i64().unwrap()],
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let got = model
        .as_dyn()
        .generate(&ints("prompt"), Some(&images.inputs()), &opts, &mut |t| {
            streamed.push(t);
            true
        })
        .unwrap();
    println!("{name}: {got:?}");
    assert_eq!(got, ints("new_tokens"), "{name}: greedy tokens differ from transformers");
    assert_eq!(streamed.len(), got.len() - usize::from(opts.eos_token_ids.contains(got.last().unwrap())));
    got
}

/// A PEFT-written adapter (`tests/fixtures/lora/<name>`, on tiny-llava-mha) against PEFT: the
/// adapted logits, one LoRA linear alone (layer 0's q_proj), and the logits after merging
/// (`merge_and_unload`, what `vsft export --merge` writes). Returns the three max abs differences.
pub fn check_peft_adapter<B: Backend>(name: &str, factor: f32) -> [f32; 3] {
    let dir = fixtures("lora").join(name);
    let r = tensors(&dir.join("reference.safetensors"));
    let base = VlmModel::<B>::load(&model_dir("tiny-llava-mha").join("legacy"), &Default::default()).unwrap();
    let (mut model, cfg) = base.load_adapter(&dir).unwrap();
    assert_eq!(cfg.rslora, name == "rslora");
    let x = inputs::<B>(&r);
    let want = r["logits"].to_f32().unwrap();
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let adapted = max_abs_diff(&logits_of(&model, &x), &want);
    println!("{name}: adapter logits max abs diff vs PEFT {adapted:.2e} (max |logit| {scale:.1}, relative {:.2e})", adapted / scale);
    assert!(adapted <= LORA_LOGITS_ABS * factor, "{name}: adapter logits differ by {adapted}");
    let q = &r["q_proj.input"];
    let q = Tensor::<B, 2>::from_data(TensorData::new(q.to_f32().unwrap(), [q.shape[0], q.shape[1]]), &Default::default());
    let linear = max_abs_diff(&values(model.language_model().model.layers[0].self_attn.q_proj.forward(q)), &r["q_proj.output"].to_f32().unwrap());
    println!("{name}: LoRA linear max abs diff vs PEFT {linear:.2e}");
    assert!(linear <= LORA_LOGITS_ABS * factor, "{name}: LoRA linear differs by {linear}");
    model.merge_lora();
    let merged = max_abs_diff(&logits_of(&model, &x), &r["merged_logits"].to_f32().unwrap());
    println!("{name}: merged logits max abs diff vs PEFT merge_and_unload {merged:.2e}");
    assert!(merged <= MERGED_LOGITS_ABS * factor, "{name} merged: {merged}");
    [adapted, linear, merged]
}
