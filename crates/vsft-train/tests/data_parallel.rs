//! Data parallel on the CPU: 2 ranks (threads, burn-collective's local level) × batch 1 ×
//! accumulation 2 against 1 rank × batch 2 × accumulation 2 over the same rows in the same
//! order, stage 2 (LoRA + projector), rows of unequal label counts, and steps where one rank
//! (and once the whole job) has only text rows. Plus: a rank that fails stops the others.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use burn::backend::Autodiff;
use vsft_data::{Batch, ImageBatch};
use vsft_model::lora::LoraConfig;
use vsft_model::weights::read_tensor_file;
use vsft_train::distributed::{run_local_ranks, Communicator};
use vsft_train::{Stage, TrainError, Trainer};

type Inner = burn::backend::Flex;
type B = Autodiff<Inner>;

const IMAGE_TOKEN: i64 = 300;
const PAD: i64 = 0;

/// The pool of single rows: the six fixture rows, each with a different number of its first
/// labels masked (so label counts differ across ranks), then two text-only rows (rows 0 and 3
/// with their image placeholders replaced by a text token and no picture).
fn rows() -> Vec<Batch> {
    let t = read_tensor_file(&common::fixtures().join("train/stage1_batches.safetensors")).unwrap();
    let mut out: Vec<Batch> = (0..6).map(|k| common::batch_from(&t, k / 2, k % 2..k % 2 + 1, true)).collect();
    for (k, b) in out.iter_mut().enumerate() {
        let mut masked = 0;
        for l in b.labels.iter_mut().filter(|l| **l != -100) {
            if masked < 3 * k {
                *l = -100;
                masked += 1;
            }
        }
        b.n_label_tokens = b.labels.iter().filter(|&&l| l != -100).count();
    }
    for k in [0, 3] {
        let mut b = out[k].clone();
        for id in b.input_ids.iter_mut().filter(|id| **id == IMAGE_TOKEN) {
            *id = 5;
        }
        b.images = ImageBatch { pixel_values: vec![], shape: vec![0, 3, 32, 32], meta: vec![] };
        out.push(b);
    }
    out
}

/// Rows stacked into one batch, right-padded to the longest.
fn stack(parts: &[&Batch]) -> Batch {
    let seq = parts.iter().map(|b| b.seq_len).max().unwrap();
    let mut out = Batch { batch_size: parts.len(), seq_len: seq, ..parts[0].clone() };
    out.input_ids.clear();
    out.attention_mask.clear();
    out.labels.clear();
    out.images = ImageBatch { pixel_values: vec![], shape: vec![0, 3, 32, 32], meta: vec![] };
    for b in parts {
        let pad = seq - b.seq_len;
        out.input_ids.extend(b.input_ids.iter().copied().chain(std::iter::repeat_n(PAD, pad)));
        out.attention_mask.extend(b.attention_mask.iter().copied().chain(std::iter::repeat_n(0, pad)));
        out.labels.extend(b.labels.iter().copied().chain(std::iter::repeat_n(-100, pad)));
        out.images.pixel_values.extend(&b.images.pixel_values);
        out.images.meta.extend(b.images.meta.iter().cloned());
        out.images.shape[0] += b.images.shape[0];
    }
    out.rows = (0..parts.len()).collect();
    out.n_label_tokens = out.labels.iter().filter(|&&l| l != -100).count();
    out.all_labels_masked = out.n_label_tokens == 0;
    out
}

/// Each step's global batch, in order (micro-batch 0 rank 0, micro-batch 0 rank 1, micro-batch
/// 1 rank 0, micro-batch 1 rank 1); 6 and 7 are the text-only rows. Step 0: rank 1 sees text
/// only; step 2: rank 0 does; step 5: the whole job does (no projector gradient anywhere).
const SCHEDULE: [[usize; 4]; 6] = [[0, 6, 1, 7], [2, 3, 4, 5], [6, 0, 7, 1], [5, 4, 3, 2], [1, 6, 2, 3], [6, 7, 7, 6]];
const LR: f64 = 2e-3;

fn trainer(lora_seed: u64) -> Trainer<B> {
    let mut model = vsft_model::VlmModel::<B>::load(&common::fixtures().join("model/tiny-llava-mha/legacy"), &Default::default()).unwrap();
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..Default::default() };
    model.add_lora(&cfg, lora_seed).unwrap();
    let mut settings = common::plain_settings(0);
    (settings.lr, settings.projector_lr, settings.weight_decay, settings.max_grad_norm) = (LR, Some(3e-3), 0.01, 1.0);
    Trainer::new(model, Stage::Instruct, settings).unwrap()
}

fn weights(t: &Trainer<B>) -> Vec<(String, Vec<f32>)> {
    t.trainable_values().into_iter().map(|(n, v)| (n, v.into_data().convert::<f32>().to_vec::<f32>().unwrap())).collect()
}

/// Runs `f` in a thread and fails the test if it does not return within `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("no result within {secs} s: a rank hangs"))
}

#[test]
fn two_ranks_equal_one_device_over_the_global_batch() {
    let pool = rows();
    let labels: Vec<usize> = pool.iter().map(|b| b.n_label_tokens).collect();
    println!("label tokens per row: {labels:?}");

    // One device: batch 2 × accumulation 2.
    let mut single = trainer(3);
    let mut single_losses = Vec::new();
    for (step, rows) in SCHEDULE.iter().enumerate() {
        let micro = [stack(&[&pool[rows[0]], &pool[rows[1]]]), stack(&[&pool[rows[2]], &pool[rows[3]]])];
        let stats = single.step(&micro, LR, step, false).unwrap().unwrap();
        assert_eq!(stats.communication_seconds, 0.0, "one device does not communicate");
        single_losses.push((stats.loss, stats.grad_norm, stats.label_tokens, stats.samples, stats.images));
    }
    let single_weights = weights(&single);

    // Two ranks: batch 1 × accumulation 2 each; rank 1's adapters start from another seed and
    // are replaced by rank 0's at the start.
    let per_rank = within(300, move || {
        run_local_ranks::<Inner, _, _>(2, &Default::default(), |comm| {
            let rank = comm.rank();
            let mut t = trainer(3 + rank as u64);
            t.broadcast_trainable(comm)?;
            let mut losses = Vec::new();
            for (step, rows) in SCHEDULE.iter().enumerate() {
                let micro = [pool[rows[rank]].clone(), pool[rows[2 + rank]].clone()];
                let stats = t.step_across(&micro, LR, step, false, comm)?.expect("finite");
                losses.push((stats.loss, stats.grad_norm, stats.label_tokens, stats.samples, stats.images));
                assert!(stats.communication_seconds > 0.0, "rank {rank} step {step}: the time in collectives is measured");
            }
            t.check_ranks_agree(comm)?;
            Ok((losses, weights(&t)))
        })
        .unwrap()
    });
    assert_eq!(per_rank.len(), 2);
    for (rank, (losses, w)) in per_rank.iter().enumerate() {
        let mut worst = (0.0f64, 0.0f64, 0.0f32);
        for (step, (got, want)) in losses.iter().zip(&single_losses).enumerate() {
            let rel = (got.0 - want.0).abs() / want.0;
            let rel_norm = (got.1 - want.1).abs() / want.1.max(1e-12);
            println!("rank {rank} step {step}: loss {:.7} vs {:.7} (rel {rel:.1e}), grad norm {:.6} vs {:.6} (rel {rel_norm:.1e})", got.0, want.0, got.1, want.1);
            assert!(rel <= 1e-6, "rank {rank} step {step}: loss differs by {rel:e}");
            assert!(rel_norm <= 1e-5, "rank {rank} step {step}: grad norm differs by {rel_norm:e}");
            assert_eq!((got.2, got.3, got.4), (want.2, want.3, want.4), "rank {rank} step {step}: label tokens, samples, images of the whole job");
            worst = (worst.0.max(rel), worst.1.max(rel_norm), worst.2);
        }
        assert_eq!(w.iter().map(|(n, _)| n).collect::<Vec<_>>(), single_weights.iter().map(|(n, _)| n).collect::<Vec<_>>());
        for ((name, got), (_, want)) in w.iter().zip(&single_weights) {
            let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            worst.2 = worst.2.max(d);
            assert!(d <= 1e-6, "rank {rank}: {name} differs from one device's by {d:e}");
        }
        println!("rank {rank}: worst loss rel {:.1e}, grad norm rel {:.1e}, final weights abs {:.1e}", worst.0, worst.1, worst.2);
    }
    assert_eq!(per_rank[0].1, per_rank[1].1, "the ranks' weights are bit-identical");
    // Step 5 had no image on any rank: the projector did not move (as on one device).
    assert!(single_losses.iter().all(|l| l.0.is_finite()));
}

#[test]
fn a_failing_rank_stops_the_others() {
    let pool = rows();
    let err = within(120, move || {
        run_local_ranks::<Inner, _, _>(2, &Default::default(), |comm| {
            let rank = comm.rank();
            let mut t = trainer(3);
            for (step, rows) in SCHEDULE.iter().enumerate() {
                if rank == 1 && step == 2 {
                    return Err(TrainError::Other("rank 1: the data file went away at step 3".into()));
                }
                t.step_across(&[pool[rows[rank]].clone(), pool[rows[2 + rank]].clone()], LR, step, false, comm)?;
            }
            Ok(())
        })
        .unwrap_err()
    });
    assert!(err.to_string().contains("rank 1: the data file went away at step 3"), "{err}");

    // The group is usable again afterwards.
    let sums = within(60, || {
        run_local_ranks::<Inner, _, _>(3, &Default::default(), |comm| {
            let t = burn::tensor::Tensor::<Inner, 1>::from_floats([comm.rank() as f32, 1.0], &Default::default());
            Ok(comm.all_reduce_sum(t)?.into_data().to_vec::<f32>().unwrap())
        })
        .unwrap()
    });
    assert_eq!(sums, vec![vec![3.0, 3.0]; 3]);
}

/// Counts the all-reduces that go through a communicator.
struct Counting<'a, C> {
    inner: &'a C,
    calls: std::sync::atomic::AtomicUsize,
}

impl<C: Communicator<Inner>> Communicator<Inner> for Counting<'_, C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: burn::tensor::Tensor<Inner, 1>) -> Result<burn::tensor::Tensor<Inner, 1>, TrainError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.all_reduce_sum(t)
    }
    fn broadcast_from_first(&self, t: burn::tensor::Tensor<Inner, 1>) -> Result<burn::tensor::Tensor<Inner, 1>, TrainError> {
        self.inner.broadcast_from_first(t)
    }
}

/// Gradients travel in buckets: tensors are packed up to the bucket size (one all-reduce per
/// bucket, a larger tensor alone), and come back whole and in order.
#[test]
fn gradients_travel_in_buckets() {
    use vsft_train::distributed::all_reduce_bucketed;
    let sizes = [3usize, 5, 2, 7, 1];
    let got = within(60, move || {
        run_local_ranks::<Inner, _, _>(2, &Default::default(), |comm| {
            let counting = Counting { inner: comm, calls: Default::default() };
            let tensors: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let v: Vec<f32> = (0..n).map(|j| (100 * i + j) as f32 + 1000.0 * comm.rank() as f32).collect();
                    burn::tensor::Tensor::<Inner, 1>::from_data(burn::tensor::TensorData::new(v, [n]), &Default::default())
                })
                .collect();
            // 8 floats per bucket: [3, 5], then 2 + 7 > 8 so [2], then [7, 1].
            let out = all_reduce_bucketed(&counting, tensors, 32)?;
            let values: Vec<Vec<f32>> = out.into_iter().map(|t| t.into_data().to_vec::<f32>().unwrap()).collect();
            Ok((counting.calls.load(std::sync::atomic::Ordering::SeqCst), values))
        })
        .unwrap()
    });
    for (calls, values) in got {
        assert_eq!(calls, 3, "buckets [3, 5], [2], [7, 1]");
        let want: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| (0..n).map(|j| 2.0 * (100 * i + j) as f32 + 1000.0).collect()).collect();
        assert_eq!(values, want);
    }
}
