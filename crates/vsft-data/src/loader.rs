//! Parallel loader: a reader thread walks the epoch order, worker threads decode images,
//! preprocess and tokenize ahead of the consumer through bounded queues, and the consumer
//! receives examples in the exact order of the epoch (deterministic whatever the timing).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::collator::{Batch, CollatorConfig};
use crate::dataset::{epoch_order, Cursor, OnBadRow, Row, RowSource, SkipStats};
use crate::error::{DataError, Result};
use crate::pipeline::Processor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub collator: CollatorConfig,
    pub shuffle: bool,
    /// Rows of this many row groups are shuffled together (see `epoch_order`).
    pub shuffle_window: usize,
    /// Worker threads (0 = process on the consumer's thread).
    pub num_workers: usize,
    /// Rows each worker may hold ready ahead of the consumer (rounded to whole batches).
    pub prefetch: usize,
    pub on_bad_row: OnBadRow,
    /// Drop a last incomplete batch of the epoch.
    pub drop_last: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 1,
            collator: CollatorConfig::default(),
            shuffle: true,
            shuffle_window: 8,
            num_workers: 2,
            prefetch: 8,
            on_bad_row: OnBadRow::Error,
            drop_last: false,
        }
    }
}

/// What a worker hands back for one batch: the end position of its row range, the batch
/// (`None` when every row was skipped) and the rows skipped in it.
type Item = (usize, Result<Option<Batch>>, SkipStats);
type Job = (usize, Vec<Result<Row>>);

enum Mode {
    Inline { source: Box<dyn RowSource>, order: Vec<usize> },
    Threads { outputs: Vec<Receiver<Item>>, handles: Vec<JoinHandle<()>> },
}

/// Iterator over the batches of one epoch, starting at a cursor.
///
/// Batch `b` holds the rows at positions `[start + b*batch_size, start + (b+1)*batch_size)` of
/// the epoch order (`start` = the cursor's position); a skipped row makes its batch one row
/// shorter. So batches, and where a resumed run continues, do not depend on timing or on
/// the number of workers.
pub struct DataLoader {
    processor: Arc<Processor>,
    cfg: LoaderConfig,
    cursor: Cursor,
    epoch_len: usize,
    /// Next position (in the epoch order) to receive.
    next_pos: usize,
    /// Index of the next batch to receive.
    next_batch: usize,
    mode: Mode,
    skipped: SkipStats,
    failed: bool,
}

/// Processes the rows of one batch: prepare each row, skip or fail on bad ones, collate.
fn process_batch(p: &Processor, rows: Vec<Result<Row>>, cfg: &LoaderConfig) -> (Result<Option<Batch>>, SkipStats) {
    let mut skipped = SkipStats::default();
    let mut prepared = Vec::with_capacity(rows.len());
    for r in rows {
        match r.and_then(|row| p.prepare_row(&row, &cfg.collator)) {
            Ok(x) => prepared.push(x),
            Err(e) if cfg.on_bad_row == OnBadRow::Skip && e.bad_row_kind().is_some() => skipped.record(&e),
            Err(e) => return (Err(e), skipped),
        }
    }
    if prepared.is_empty() {
        return (Ok(None), skipped);
    }
    (Ok(Some(p.collate_prepared(&prepared, &cfg.collator))), skipped)
}

/// Position ranges of the batches of an epoch from `start`.
fn batch_ranges(start: usize, len: usize, bs: usize, drop_last: bool) -> impl Iterator<Item = (usize, usize)> {
    let bs = bs.max(1);
    (start..len).step_by(bs).map(move |s| (s, (s + bs).min(len))).filter(move |&(s, e)| !drop_last || e - s == bs)
}

impl DataLoader {
    /// Starts loading `source` from `cursor` (use `Cursor { seed, epoch: 0, position: 0 }` to
    /// start; store `loader.cursor()` in checkpoints to resume after the last batch yielded).
    pub fn new(mut source: Box<dyn RowSource>, processor: Arc<Processor>, cfg: LoaderConfig, cursor: Cursor) -> Self {
        if cfg.shuffle {
            source.set_group_window(cfg.shuffle_window);
        }
        let order = epoch_order(&source.groups(), cursor.seed, cursor.epoch, cfg.shuffle, cfg.shuffle_window);
        let epoch_len = order.len();
        let start = cursor.position.min(epoch_len);
        let mode = if cfg.num_workers == 0 {
            Mode::Inline { source, order }
        } else {
            Self::spawn(source, order, start, processor.clone(), &cfg)
        };
        DataLoader { processor, cfg, cursor, epoch_len, next_pos: start, next_batch: 0, mode, skipped: SkipStats::default(), failed: false }
    }

    fn spawn(mut source: Box<dyn RowSource>, order: Vec<usize>, start: usize, processor: Arc<Processor>, cfg: &LoaderConfig) -> Mode {
        let n = cfg.num_workers;
        let depth = (cfg.prefetch / cfg.batch_size.max(1)).max(1);
        let mut inputs: Vec<SyncSender<Job>> = Vec::new();
        let mut outputs = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            let (tx_in, rx_in) = sync_channel::<Job>(depth);
            let (tx_out, rx_out) = sync_channel::<Item>(depth);
            let p = processor.clone();
            let lcfg = cfg.clone();
            handles.push(std::thread::spawn(move || {
                for (end, rows) in rx_in {
                    let (r, skipped) = process_batch(&p, rows, &lcfg);
                    if tx_out.send((end, r, skipped)).is_err() {
                        break;
                    }
                }
            }));
            inputs.push(tx_in);
            outputs.push(rx_out);
        }
        let (bs, drop_last) = (cfg.batch_size, cfg.drop_last);
        handles.push(std::thread::spawn(move || {
            for (b, (s, e)) in batch_ranges(start, order.len(), bs, drop_last).enumerate() {
                let rows: Vec<Result<Row>> = order[s..e].iter().map(|&i| source.get(i)).collect();
                if inputs[b % n].send((e, rows)).is_err() {
                    break;
                }
            }
        }));
        Mode::Threads { outputs, handles }
    }

    /// Position after the last batch yielded: store it in checkpoints.
    pub fn cursor(&self) -> Cursor {
        Cursor { position: self.next_pos, ..self.cursor }
    }

    /// Rows skipped so far (with `on_bad_row = skip`), by reason.
    pub fn skipped(&self) -> &SkipStats {
        &self.skipped
    }

    /// Rows in this epoch.
    pub fn epoch_len(&self) -> usize {
        self.epoch_len
    }

    /// The next batch's result, or None at the end of the epoch.
    fn next_item(&mut self) -> Option<Item> {
        match &mut self.mode {
            Mode::Inline { source, order } => {
                let (s, e) = batch_ranges(self.next_pos, order.len(), self.cfg.batch_size, self.cfg.drop_last).next()?;
                let rows: Vec<Result<Row>> = order[s..e].iter().map(|&i| source.get(i)).collect();
                let (r, skipped) = process_batch(&self.processor, rows, &self.cfg);
                Some((e, r, skipped))
            }
            Mode::Threads { outputs, .. } => {
                let n = outputs.len();
                outputs[self.next_batch % n].recv().ok()
            }
        }
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        loop {
            if self.failed || self.next_pos >= self.epoch_len {
                return None;
            }
            let (end, r, skipped) = match self.next_item() {
                Some(x) => x,
                None => {
                    // end of the epoch (drop_last) or a worker gone
                    if !matches!(self.mode, Mode::Inline { .. }) && batch_ranges(self.next_pos, self.epoch_len, self.cfg.batch_size, self.cfg.drop_last).next().is_some() {
                        self.failed = true;
                        return Some(Err(DataError::Other("data loader worker stopped".into())));
                    }
                    return None;
                }
            };
            self.next_batch += 1;
            self.skipped.merge(&skipped);
            match r {
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Ok(None) => {
                    self.next_pos = end;
                    continue;
                }
                Ok(Some(b)) => {
                    self.next_pos = end;
                    return Some(Ok(b));
                }
            }
        }
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        if let Mode::Threads { outputs, handles } = &mut self.mode {
            outputs.clear(); // workers see closed channels and stop
            for h in handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Cursor {
    /// The cursor at the start of the next epoch.
    pub fn next_epoch(self) -> Cursor {
        Cursor { seed: self.seed, epoch: self.epoch + 1, position: 0 }
    }
}
