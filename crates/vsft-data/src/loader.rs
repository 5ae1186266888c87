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
use crate::guard::{catch_panic, read_row, row_guard};
use crate::pipeline::Processor;

/// Most worker threads (`data.num_workers`): more than any machine has cores for.
pub const MAX_NUM_WORKERS: usize = 256;
/// Stack of each loader thread: as much as a main thread gets, so that templates nest as
/// deep as their recursion limit allows wherever they are rendered.
pub const WORKER_STACK_BYTES: usize = 8 << 20;
/// Most batches queued per worker, whatever `prefetch` asks (each queue slot is allocated).
const MAX_QUEUED_BATCHES: usize = 64;

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
    /// This loader's part of a data-parallel job: see [`Shard`].
    #[serde(default)]
    pub shard: Shard,
}

/// One rank's part of every batch of a data-parallel job. The epoch order is walked in
/// global batches of `batch_size × world` rows; rank `r` keeps rows `[r·batch_size,
/// (r+1)·batch_size)` of each. So the ranks together cover the epoch exactly once, their
/// rows are those one device would see at batch `batch_size × world` in the same order,
/// and the cursor (a position in the epoch order) is the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

impl Shard {
    /// This rank's positions `[s, e)` of the global batch `[start, end)`.
    fn part(&self, (start, end): (usize, usize), batch_size: usize) -> (usize, usize) {
        let s = (start + self.rank * batch_size).min(end);
        (s, (s + batch_size).min(end))
    }
}

impl LoaderConfig {
    /// Refuses settings the loader cannot honour, naming the recipe key.
    pub fn validate(&self) -> Result<()> {
        if self.shard.world == 0 || self.shard.rank >= self.shard.world {
            return Err(DataError::Other(format!("loader shard: rank {} of a world of {}", self.shard.rank, self.shard.world)));
        }
        if self.num_workers > MAX_NUM_WORKERS {
            return Err(DataError::Setting {
                key: "data.num_workers",
                msg: format!("{} worker threads requested; 0 to {MAX_NUM_WORKERS} are allowed (0 = process on the training thread)", self.num_workers),
            });
        }
        self.collator.validate()
    }
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
            shard: Shard::default(),
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
    /// The configuration was refused or the threads could not start: the error is the
    /// first item.
    Failed(Option<DataError>),
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
/// A panic while processing a row fails (or skips) that row with the panic's message.
fn process_batch(p: &Processor, rows: Vec<Result<Row>>, cfg: &LoaderConfig) -> (Result<Option<Batch>>, SkipStats) {
    let mut skipped = SkipStats::default();
    let mut prepared = Vec::with_capacity(rows.len());
    for r in rows {
        let r = r.and_then(|row| row_guard(&row, || p.prepare_row(&row, &cfg.collator)));
        match r {
            Ok(x) => prepared.push(x),
            Err(e) if cfg.on_bad_row == OnBadRow::Skip && e.bad_row_kind().is_some() => skipped.record(&e),
            Err(e) => return (Err(e), skipped),
        }
    }
    if prepared.is_empty() {
        return (Ok(None), skipped);
    }
    let batch = catch_panic(|| p.collate_prepared(&prepared, &cfg.collator))
        .unwrap_or_else(|msg| Err(DataError::Other(format!("collating rows {} failed: {msg}", row_list(&prepared)))));
    (batch.map(Some), skipped)
}

/// `rows 3, 8, 9` of a batch (indices in the split), for errors about the batch as a whole.
fn row_list(prepared: &[crate::pipeline::Prepared]) -> String {
    prepared.iter().map(|r| r.index.to_string()).collect::<Vec<_>>().join(", ")
}

/// Reads the rows at `positions` of the order.
fn read_rows(source: &mut dyn RowSource, positions: &[usize]) -> Vec<Result<Row>> {
    positions.iter().map(|&i| read_row(source, i)).collect()
}

/// Position ranges of the (global) batches of an epoch from `start`: `bs` rows each, times
/// the shard's world.
fn batch_ranges(start: usize, len: usize, bs: usize, drop_last: bool, shard: Shard) -> impl Iterator<Item = (usize, usize)> {
    let bs = bs.max(1) * shard.world.max(1);
    (start..len).step_by(bs).map(move |s| (s, (s + bs).min(len))).filter(move |&(s, e)| !drop_last || e - s == bs)
}

impl DataLoader {
    /// Starts loading `source` from `cursor` (use `Cursor { seed, epoch: 0, position: 0 }` to
    /// start; store `loader.cursor()` in checkpoints to resume after the last batch yielded).
    /// A configuration that cannot be honoured (see `LoaderConfig::validate`) or threads that
    /// cannot start make the first item an error; `try_new` returns it instead.
    pub fn new(mut source: Box<dyn RowSource>, processor: Arc<Processor>, cfg: LoaderConfig, cursor: Cursor) -> Self {
        if cfg.shuffle {
            source.set_group_window(cfg.shuffle_window);
        }
        let order = epoch_order(&source.groups(), cursor.seed, cursor.epoch, cfg.shuffle, cfg.shuffle_window);
        let epoch_len = order.len();
        let start = cursor.position.min(epoch_len);
        let mode = match cfg.validate() {
            Err(e) => Mode::Failed(Some(e)),
            Ok(()) if cfg.num_workers == 0 => Mode::Inline { source, order },
            Ok(()) => Self::spawn(source, order, start, processor.clone(), &cfg).unwrap_or_else(|e| Mode::Failed(Some(e))),
        };
        DataLoader { processor, cfg, cursor, epoch_len, next_pos: start, next_batch: 0, mode, skipped: SkipStats::default(), failed: false }
    }

    /// `new`, returning a refused configuration or a failure to start the threads as an error.
    pub fn try_new(source: Box<dyn RowSource>, processor: Arc<Processor>, cfg: LoaderConfig, cursor: Cursor) -> Result<Self> {
        let mut loader = Self::new(source, processor, cfg, cursor);
        match &mut loader.mode {
            Mode::Failed(e) => Err(e.take().expect("a failed loader holds its error until it is taken")),
            _ => Ok(loader),
        }
    }

    fn spawn(mut source: Box<dyn RowSource>, order: Vec<usize>, start: usize, processor: Arc<Processor>, cfg: &LoaderConfig) -> Result<Mode> {
        let n = cfg.num_workers;
        let depth = (cfg.prefetch / cfg.batch_size.max(1)).clamp(1, MAX_QUEUED_BATCHES);
        let mut inputs: Vec<SyncSender<Job>> = Vec::new();
        let mut outputs = Vec::new();
        let mut handles = Vec::new();
        let thread = |name: String| std::thread::Builder::new().name(name).stack_size(WORKER_STACK_BYTES);
        // On a failure to start, the threads started so far see their queues close and end.
        let spawn_err = |what: String, e: std::io::Error| DataError::Setting {
            key: "data.num_workers",
            msg: format!("cannot start {what} of {n} worker threads ({e}); use fewer workers, or 0 to process on the training thread"),
        };
        for w in 0..n {
            let (tx_in, rx_in) = sync_channel::<Job>(depth);
            let (tx_out, rx_out) = sync_channel::<Item>(depth);
            let p = processor.clone();
            let lcfg = cfg.clone();
            let h = thread(format!("vsft-data-worker-{w}"))
                .spawn(move || {
                    for (end, rows) in rx_in {
                        let (r, skipped) = process_batch(&p, rows, &lcfg);
                        if tx_out.send((end, r, skipped)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| spawn_err(format!("worker {w}"), e))?;
            handles.push(h);
            inputs.push(tx_in);
            outputs.push(rx_out);
        }
        let (bs, drop_last, shard) = (cfg.batch_size, cfg.drop_last, cfg.shard);
        let reader = thread("vsft-data-reader".into())
            .spawn(move || {
                for (b, (s, e)) in batch_ranges(start, order.len(), bs, drop_last, shard).enumerate() {
                    let (ps, pe) = shard.part((s, e), bs);
                    let rows = read_rows(source.as_mut(), &order[ps..pe]);
                    if inputs[b % n].send((e, rows)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| spawn_err("the reader thread in addition to the".into(), e))?;
        handles.push(reader);
        Ok(Mode::Threads { outputs, handles })
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
                let (s, e) = batch_ranges(self.next_pos, order.len(), self.cfg.batch_size, self.cfg.drop_last, self.cfg.shard).next()?;
                let (ps, pe) = self.cfg.shard.part((s, e), self.cfg.batch_size);
                let rows = read_rows(source.as_mut(), &order[ps..pe]);
                let (r, skipped) = process_batch(&self.processor, rows, &self.cfg);
                Some((e, r, skipped))
            }
            Mode::Threads { outputs, .. } => {
                let n = outputs.len();
                outputs[self.next_batch % n].recv().ok()
            }
            Mode::Failed(_) => None, // reported by `next` before asking for items
        }
    }

    /// Why the threads stopped before the end of the epoch: the panic of one that panicked
    /// (errors of rows are sent as items, so only a bug elsewhere ends a thread early).
    fn stopped_threads_error(&mut self) -> DataError {
        let mut why = Vec::new();
        if let Mode::Threads { outputs, handles } = &mut self.mode {
            outputs.clear();
            for h in handles.drain(..) {
                let name = h.thread().name().unwrap_or("a data loader thread").to_string();
                if let Err(p) = h.join() {
                    why.push(format!("{name} panicked: {}", crate::guard::panic_message(p.as_ref())));
                }
            }
        }
        if why.is_empty() {
            why.push("no thread reported why".into());
        }
        DataError::Other(format!("the data loader stopped before the end of the epoch: {}", why.join("; ")))
    }
}

impl DataLoader {
    /// The next global batch's part for this loader: `Some(Ok(None))` when it holds no row
    /// (its rows were all skipped, or a sharded loader's part of a short last batch is
    /// empty), `None` at the end of the epoch. Ranks of a data-parallel job call this in
    /// step, one call per global batch on each; [`Iterator::next`] passes over the empty ones.
    pub fn next_slot(&mut self) -> Option<Result<Option<Batch>>> {
        if self.failed {
            return None;
        }
        if let Mode::Failed(e) = &mut self.mode {
            self.failed = true;
            return e.take().map(Err);
        }
        if self.next_pos >= self.epoch_len {
            return None;
        }
        let (end, r, skipped) = match self.next_item() {
            Some(x) => x,
            None => {
                // end of the epoch (drop_last) or a thread gone
                if matches!(self.mode, Mode::Threads { .. })
                    && batch_ranges(self.next_pos, self.epoch_len, self.cfg.batch_size, self.cfg.drop_last, self.cfg.shard).next().is_some()
                {
                    self.failed = true;
                    return Some(Err(self.stopped_threads_error()));
                }
                return None;
            }
        };
        self.next_batch += 1;
        self.skipped.merge(&skipped);
        match r {
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
            Ok(b) => {
                self.next_pos = end;
                Some(Ok(b))
            }
        }
    }
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        loop {
            match self.next_slot()? {
                Ok(None) => continue,
                Ok(Some(b)) => return Some(Ok(b)),
                Err(e) => return Some(Err(e)),
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
