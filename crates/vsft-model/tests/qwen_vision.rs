//! The Qwen2-VL / Qwen2.5-VL vision tower (`vsft_model::qwen_vision`) against transformers 5.24
//! (fixtures from scripts/make_qwen_vl_model_fixtures.py: tiny random models, real photographs,
//! three images of different shapes in one batch; Qwen2.5-VL's windows split every image).
//!
//! Compared with the fixture: the 2D rotary tables and `inv_freq`, Qwen2.5-VL's window index and
//! window lengths, the blocks' output before the merger, and the merged image features. The
//! fixture's gradients are those of the whole model's loss (decoder included), so they are left
//! to the model's own parity test; here the tower's backward is checked against central finite
//! differences of a fixed linear function of its features, and the fused CPU kernels against
//! Burn's composed ops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::backend::Flex;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use vsft_model::qwen_vision::{expected_tensors, vision_inv_freq, QwenVisionConfig, QwenVisionTower, VisionVersion};
use vsft_model::weights::{read_tensor_file, Builder, Init, ModulePath, RawTensor, TensorProvider};

type Cpu = Flex;
type Train = common::Train;

mod common;
use common::{max_abs_diff, rel_diff, values};

/// The tests switch the fused kernels off and on (a process-wide setting): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn fixture(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen_vl/model").join(model)
}

fn tensors(model: &str, file: &str) -> BTreeMap<String, RawTensor> {
    read_tensor_file(&fixture(model).join(file)).expect("fixture (run scripts/make_qwen_vl_model_fixtures.py)")
}

/// Serves `visual.*` tensors of a Hub-layout checkpoint by name, optionally with one element
/// nudged (for finite differences), and records what it could not serve.
struct VisualProvider<'a> {
    file: &'a BTreeMap<String, RawTensor>,
    served: BTreeSet<String>,
    problems: Vec<String>,
    nudge: Option<(&'a str, usize, f32)>,
}

impl<'a> VisualProvider<'a> {
    fn new(file: &'a BTreeMap<String, RawTensor>) -> Self {
        Self { file, served: BTreeSet::new(), problems: Vec::new(), nudge: None }
    }
}

impl TensorProvider for VisualProvider<'_> {
    fn provide(&mut self, name: &str, shape: &[usize], _init: Init) -> Option<Vec<f32>> {
        let Some(t) = self.file.get(name) else {
            self.problems.push(format!("missing {name} {shape:?}"));
            return None;
        };
        if t.shape != shape {
            self.problems.push(format!("{name}: file {:?}, model {shape:?}", t.shape));
            return None;
        }
        self.served.insert(name.to_string());
        let mut v = t.to_f32().unwrap();
        if let Some((n, i, delta)) = self.nudge {
            if n == name {
                v[i] += delta;
            }
        }
        Some(v)
    }
}

fn config(model: &str) -> QwenVisionConfig {
    let text = std::fs::read_to_string(fixture(model).join("hub/config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let version = VisionVersion::from_model_type(v["model_type"].as_str().unwrap()).unwrap();
    QwenVisionConfig::from_value(&v["vision_config"], version).unwrap()
}

fn build<B: Backend>(cfg: &QwenVisionConfig, file: &BTreeMap<String, RawTensor>, nudge: Option<(&str, usize, f32)>) -> QwenVisionTower<B> {
    let mut p = VisualProvider::new(file);
    p.nudge = nudge;
    let tower = QwenVisionTower::new(&mut Builder::new(&mut p, &Default::default()), cfg);
    assert!(p.problems.is_empty(), "checkpoint problems: {:?}", p.problems);
    let in_file: BTreeSet<String> = file.keys().filter(|k| k.starts_with("visual.")).cloned().collect();
    assert_eq!(p.served, in_file, "the tower reads exactly the file's visual.* tensors");
    let expected: BTreeSet<String> = expected_tensors(cfg).into_keys().collect();
    assert_eq!(expected, in_file, "expected_tensors lists the file's visual.* tensors");
    tower
}

fn grids(inputs: &BTreeMap<String, RawTensor>) -> Vec<(usize, usize, usize)> {
    inputs["image_grid_thw"].to_i64().unwrap().chunks(3).map(|g| (g[0] as usize, g[1] as usize, g[2] as usize)).collect()
}

fn pixels<B: Backend>(inputs: &BTreeMap<String, RawTensor>) -> Tensor<B, 2> {
    let p = &inputs["pixel_values"];
    Tensor::from_data(TensorData::new(p.to_f32().unwrap(), [p.shape[0], p.shape[1]]), &Default::default())
}

/// A fixed pseudo-random weighting of the features (the loss is `Σ features · weights`).
fn loss_weights(n: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Every float parameter's gradient by tensor name.
fn grads_by_name(tower: &QwenVisionTower<Train>, grads: &<Train as burn::tensor::backend::AutodiffBackend>::Gradients) -> BTreeMap<String, Vec<f32>> {
    struct V<'a> {
        path: ModulePath,
        grads: &'a <Train as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: BTreeMap<String, Vec<f32>>,
    }
    impl ModuleVisitor<Train> for V<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Train, D>>) {
            let name = format!("visual.{}", self.path.join());
            let g = param.val().grad(self.grads).map(values).unwrap_or_default();
            self.out.insert(name, g);
        }
    }
    let mut v = V { path: ModulePath::default(), grads, out: BTreeMap::new() };
    tower.visit(&mut v);
    v.out
}

fn check(model: &str) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = config(model);
    let file = read_tensor_file(&fixture(model).join("hub/model.safetensors")).unwrap();
    let inputs = tensors(model, "inputs.safetensors");
    let r = tensors(model, "reference.safetensors");
    let grids = grids(&inputs);
    let tower = build::<Cpu>(&cfg, &file, None);
    let dev = Default::default();
    let ctx = tower.context(&grids, &dev).unwrap();

    // 2D rotary embedding: inv_freq and the tables in the processor's patch order.
    let inv = vision_inv_freq(cfg.head_dim(), cfg.rope_theta());
    let d_inv = max_abs_diff(&inv, &r["rope.vision_inv_freq"].to_f32().unwrap());
    let cos = values(tower.unpermute_patches(ctx.cos.clone(), &ctx));
    let sin = values(tower.unpermute_patches(ctx.sin.clone(), &ctx));
    let d_cos = max_abs_diff(&cos, &r["rope.vision_cos"].to_f32().unwrap());
    let d_sin = max_abs_diff(&sin, &r["rope.vision_sin"].to_f32().unwrap());
    println!("{model}: rope inv_freq {d_inv:.1e}, cos {d_cos:.1e}, sin {d_sin:.1e}");
    assert!(d_inv <= 1e-7 && d_cos <= 1e-6 && d_sin <= 1e-6, "{model}: rotary tables differ");

    // Windows (Qwen2.5-VL): transformers' window_index and cu_window_seqlens.
    if cfg.version == VisionVersion::Qwen25 {
        let wi: Vec<usize> = r["window.batch_window_index"].to_i64().unwrap().iter().map(|&i| i as usize).collect();
        assert_eq!(ctx.window_index.as_ref(), Some(&wi), "{model}: window_index");
        let cu = r["window.batch_cu_window_seqlens"].to_i64().unwrap();
        let lens: Vec<usize> = cu.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        assert_eq!(ctx.window_segments, lens, "{model}: window lengths");
        assert!(ctx.window_segments.len() > grids.len(), "{model}: the windows split the images");
        println!("{model}: {} windows over {} images, as transformers cuts them", lens.len(), grids.len());
    } else {
        assert!(ctx.window_index.is_none());
    }

    // The blocks' output before the merger, and the merged features.
    let mut x = tower.stem(pixels::<Cpu>(&inputs), &ctx).unwrap();
    for i in 0..tower.depth() {
        x = tower.layer(i, x, &ctx);
    }
    let last = values(tower.unpermute_patches(x.clone(), &ctx));
    let d_last = rel_diff(&last, &r["vision_last_hidden"].to_f32().unwrap());
    let feats = values(tower.merge(x, &ctx));
    let want = r["image_features"].to_f32().unwrap();
    let d_feat = rel_diff(&feats, &want);
    println!("{model}: last hidden rel diff {d_last:.2e}, features rel diff {d_feat:.2e} (max |ref| {:.2})", want.iter().fold(0f32, |m, v| m.max(v.abs())));
    assert!(d_last <= 1e-5, "{model}: vision last hidden state differs by {d_last}");
    assert!(d_feat <= 1e-5, "{model}: image features differ by {d_feat}");
    let lens: Vec<usize> = r["image_feature_lens"].to_i64().unwrap().iter().map(|&n| n as usize).collect();
    assert_eq!(ctx.tokens_per_image, lens);
    // The one-call API gives the same numbers.
    let whole = values(tower.features(pixels::<Cpu>(&inputs), &grids).unwrap());
    assert_eq!(whole, feats);

    // Burn's composed ops (the path of every other backend) against the fused CPU kernels.
    vsft_kernels::set_enabled(false);
    let composed = values(tower.features(pixels::<Cpu>(&inputs), &grids).unwrap());
    vsft_kernels::set_enabled(true);
    let d_comp = rel_diff(&composed, &want);
    println!("{model}: composed ops: features rel diff {d_comp:.2e}");
    assert!(d_comp <= 1e-5, "{model}: composed features differ by {d_comp}");

    // Backward: Σ features·w under Autodiff<Flex>, every parameter gets a gradient, and a few
    // entries match central finite differences.
    let w = loss_weights(want.len());
    let out_dim = cfg.out_dim();
    let train = build::<Train>(&cfg, &file, None);
    let f = train.features(pixels::<Train>(&inputs), &grids).unwrap();
    let wt = Tensor::<Train, 2>::from_data(TensorData::new(w.clone(), [want.len() / out_dim, out_dim]), &dev);
    let d_train = rel_diff(&values(f.clone()), &feats);
    assert!(d_train <= 1e-6, "{model}: features under autodiff differ by {d_train}");
    let grads = grads_by_name(&train, &(f * wt).sum().backward());
    for (name, g) in &grads {
        assert!(!g.is_empty() && g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| v != 0.0), "{model}: {name} has no useful gradient");
    }
    let loss = |nudge: (&str, usize, f32)| -> f64 {
        let t = build::<Cpu>(&cfg, &file, Some(nudge));
        let f = values(t.features(pixels::<Cpu>(&inputs), &grids).unwrap());
        f.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let last_block = cfg.depth - 1;
    let probes = [
        "visual.patch_embed.proj.weight".to_string(),
        "visual.blocks.0.attn.qkv.weight".to_string(),
        format!("visual.blocks.{last_block}.attn.qkv.weight"),
        "visual.blocks.0.norm1.weight".to_string(),
        "visual.merger.mlp.0.weight".to_string(),
    ];
    let mut worst = 0f64;
    for name in &probes {
        let g = &grads[name];
        let (i, &gi) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let eps = 1e-2f32;
        let fd = (loss((name, i, eps)) - loss((name, i, -eps))) / (2.0 * eps as f64);
        let rel = (fd - gi as f64).abs() / (gi as f64).abs();
        println!("{model}: d/d {name}[{i}]: autodiff {gi:.5e}, finite difference {fd:.5e} (rel {rel:.1e})");
        worst = worst.max(rel);
    }
    assert!(worst <= 1e-2, "{model}: gradients differ from finite differences by {worst}");
}

#[test]
fn qwen2_vl_vision_tower_matches_transformers() {
    check("qwen2_vl");
}

#[test]
fn qwen2_5_vl_vision_tower_matches_transformers() {
    check("qwen2_5_vl");
}

#[test]
fn bad_grids_and_pixels_are_errors() {
    let cfg = config("qwen2_5_vl");
    let file = read_tensor_file(&fixture("qwen2_5_vl").join("hub/model.safetensors")).unwrap();
    let tower = build::<Cpu>(&cfg, &file, None);
    let dev = Default::default();
    let px = |rows: usize, cols: usize| Tensor::<Cpu, 2>::zeros([rows, cols], &dev);
    let err = |r: Result<Tensor<Cpu, 2>, vsft_model::ModelError>| r.unwrap_err().to_string();
    let e = err(tower.features(px(16, 1176), &[(1, 4, 4), (1, 4, 6)]));
    assert!(e.contains("image 1"), "{e}");
    let e = err(tower.features(px(20, 1176), &[(1, 4, 5)]));
    assert!(e.contains("image 0") && e.contains("spatial_merge_size"), "{e}");
    let e = err(tower.features(px(16, 1000), &[(1, 4, 4)]));
    assert!(e.contains("1176"), "{e}");
    assert!(tower.features(px(16, 1176), &[(1, 4, 4)]).is_ok());
}
