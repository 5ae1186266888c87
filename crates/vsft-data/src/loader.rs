//! Parallel loader: a reader thread walks the epoch order, worker threads decode images,
//! preprocess and tokenize ahead of the consumer through bounded queues, and the consumer
//! receives examples in the exact order of the epoch (deterministic whatever the timing).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::collator::{Batch, CollatorConfig, Example};
use crate::dataset::{epoch_order, Cursor, OnBadRow, RowSource, SkipStats};
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
    /// Examples each worker may hold ready ahead of the consumer.
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

type Item = (usize, Result<Example>);

enum Mode {
    Inline { source: Box<dyn RowSource>, order: Vec<usize> },
    Threads { outputs: Vec<Receiver<Item>>, handles: Vec<JoinHandle<()>> },
}

/// Iterator over the batches of one epoch, starting at a cursor.
pub struct DataLoader {
    processor: Arc<Processor>,
    cfg: LoaderConfig,
    cursor: Cursor,
    epoch_len: usize,
    /// Next position (in the epoch order) to receive.
    next_pos: usize,
    mode: Mode,
    skipped: SkipStats,
    failed: bool,
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
        DataLoader { processor, cfg, cursor, epoch_len, next_pos: start, mode, skipped: SkipStats::default(), failed: false }
    }

    fn spawn(mut source: Box<dyn RowSource>, order: Vec<usize>, start: usize, processor: Arc<Processor>, cfg: &LoaderConfig) -> Mode {
        let n = cfg.num_workers;
        let mut inputs: Vec<SyncSender<(usize, Result<crate::dataset::Row>)>> = Vec::new();
        let mut outputs = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            let (tx_in, rx_in) = sync_channel::<(usize, Result<crate::dataset::Row>)>(cfg.prefetch.max(1));
            let (tx_out, rx_out) = sync_channel::<Item>(cfg.prefetch.max(1));
            let p = processor.clone();
            let ccfg = cfg.collator.clone();
            handles.push(std::thread::spawn(move || {
                for (pos, row) in rx_in {
                    let r = row.and_then(|row| p.process_row(&row, &ccfg));
                    if tx_out.send((pos, r)).is_err() {
                        break;
                    }
                }
            }));
            inputs.push(tx_in);
            outputs.push(rx_out);
        }
        handles.push(std::thread::spawn(move || {
            for (pos, &idx) in order.iter().enumerate().skip(start) {
                let row = source.get(idx);
                if inputs[pos % n].send((pos, row)).is_err() {
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

    fn next_example(&mut self) -> Option<Result<Example>> {
        if self.next_pos >= self.epoch_len {
            return None;
        }
        let pos = self.next_pos;
        let r = match &mut self.mode {
            Mode::Inline { source, order } => source.get(order[pos]).and_then(|row| self.processor.process_row(&row, &self.cfg.collator)),
            Mode::Threads { outputs, .. } => {
                let n = outputs.len();
                match outputs[pos % n].recv() {
                    Ok((p, r)) => {
                        debug_assert_eq!(p, pos);
                        r
                    }
                    Err(_) => Err(DataError::Other("data loader worker stopped".into())),
                }
            }
        };
        self.next_pos += 1;
        Some(r)
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed {
            return None;
        }
        let mut examples = Vec::with_capacity(self.cfg.batch_size);
        while examples.len() < self.cfg.batch_size {
            match self.next_example() {
                None => break,
                Some(Ok(e)) => examples.push(e),
                Some(Err(e)) => {
                    if self.cfg.on_bad_row == OnBadRow::Skip && e.bad_row_kind().is_some() {
                        self.skipped.record(&e);
                    } else {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            }
        }
        if examples.is_empty() || (self.cfg.drop_last && examples.len() < self.cfg.batch_size) {
            return None;
        }
        Some(Ok(self.processor.collate(&examples, &self.cfg.collator)))
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
