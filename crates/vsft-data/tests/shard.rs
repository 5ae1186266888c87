//! Data-parallel sharding of the loader: the ranks' parts of each global batch are the rows
//! one loader gives at the global batch size, in the same order, with the same cursor; a
//! rank's empty part of a short last batch is an empty slot, not a missing one.

use std::path::PathBuf;
use std::sync::Arc;

use vsft_data::collator::CollatorConfig;
use vsft_data::dataset::{open_dataset, Cursor, OnBadRow};
use vsft_data::{DataLoader, LoaderConfig, Processor, Shard};

fn fx() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/data")
}

fn loader(batch_size: usize, workers: usize, shard: Shard, cursor: Cursor) -> DataLoader {
    let src = open_dataset(fx().join("llava_instruct_mix").to_str().unwrap(), Some("train"), None).unwrap();
    let processor = Processor::from_model_dir(&fx().join("model"), Some(&fx().join("llava_hf.jinja"))).unwrap();
    let cfg = LoaderConfig {
        batch_size,
        collator: CollatorConfig::default(),
        shuffle: true,
        shuffle_window: 2,
        num_workers: workers,
        prefetch: 2,
        on_bad_row: OnBadRow::Error,
        drop_last: false,
        shard,
    };
    DataLoader::new(src, Arc::new(processor), cfg, cursor)
}

/// Each slot's rows and the cursor after it, to the end of the epoch.
fn slots(mut l: DataLoader) -> Vec<(Vec<usize>, usize)> {
    let mut out = Vec::new();
    while let Some(slot) = l.next_slot() {
        let rows = slot.unwrap().map(|b| b.rows).unwrap_or_default();
        out.push((rows, l.cursor().position));
    }
    out
}

#[test]
fn ranks_together_see_what_one_loader_sees_at_the_global_batch() {
    let cursor = Cursor { seed: 7, epoch: 1, position: 0 };
    for workers in [0, 2] {
        for start in [0, 4] {
            let at = Cursor { position: start, ..cursor };
            let whole = slots(loader(4, workers, Shard::default(), at));
            let ranks: Vec<_> = (0..2).map(|rank| slots(loader(2, workers, Shard { rank, world: 2 }, at))).collect();
            assert_eq!(ranks[0].len(), whole.len(), "workers {workers}, start {start}: one slot per global batch on every rank");
            assert_eq!(ranks[1].len(), whole.len());
            for (i, (rows, end)) in whole.iter().enumerate() {
                let joined: Vec<usize> = ranks[0][i].0.iter().chain(&ranks[1][i].0).copied().collect();
                assert_eq!(&joined, rows, "workers {workers}, start {start}, batch {i}: the ranks' rows");
                assert_eq!((ranks[0][i].1, ranks[1][i].1), (*end, *end), "the cursor is the same on every rank");
            }
        }
    }
    // 10 rows at a global batch of 4: the last batch has 2 rows, all rank 0's.
    let last = slots(loader(2, 0, Shard { rank: 1, world: 2 }, cursor)).pop().unwrap();
    assert_eq!(last, (vec![], 10), "rank 1's part of the short last batch is an empty slot");
    let all: usize = slots(loader(2, 0, Shard { rank: 0, world: 2 }, cursor)).iter().chain(&slots(loader(2, 0, Shard { rank: 1, world: 2 }, cursor))).map(|s| s.0.len()).sum();
    assert_eq!(all, 10, "the ranks cover the epoch exactly once");
}

#[test]
fn a_shard_outside_the_world_is_refused() {
    let l = loader(2, 0, Shard { rank: 2, world: 2 }, Cursor::default());
    let err = l.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("rank 2 of a world of 2"), "{err}");
}
