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
