//! rows -> batches throughput of vsft-data (decode, preprocess, template, tokenize, collate).
//!
//!     cargo run --profile test -p vsft-data --example bench_data -- MODEL_DIR DATA N BATCH WORKERS [MASK]
//!
//! DATA's rows are repeated until N samples have been produced. Prints one JSON line.
use std::sync::Arc;
use std::time::Instant;

use vsft_data::dataset::{open_dataset, Cursor, Row, RowSource};
use vsft_data::{CollatorConfig, DataLoader, LoaderConfig, Processor, Result};

struct Repeat {
    inner: Box<dyn RowSource>,
    n: usize,
    cache: Vec<Option<Row>>,
}

impl RowSource for Repeat {
    fn len(&self) -> usize {
        self.n
    }
    fn get(&mut self, index: usize) -> Result<Row> {
        // Reads each underlying row once (parquet decode is part of the first pass only;
        // the images are still decoded and preprocessed for every sample).
        let k = index % self.inner.len();
        if self.cache[k].is_none() {
            self.cache[k] = Some(self.inner.get(k)?);
        }
        let mut r = self.cache[k].clone().unwrap();
        r.index = index;
        Ok(r)
    }
    fn groups(&self) -> Vec<(usize, usize)> {
        vec![(0, self.n)]
    }
    fn describe(&self) -> String {
        format!("{} repeated to {}", self.inner.describe(), self.n)
    }
}

/// CPU seconds (user + system) of this process, from /proc/self/stat (Linux).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = std::path::PathBuf::from(&a[1]);
    let data = &a[2];
    let n: usize = a[3].parse().unwrap();
    let bs: usize = a[4].parse().unwrap();
    let workers: usize = a[5].parse().unwrap();
    let mask = a.get(6).map(|s| s.parse().unwrap()).unwrap_or_default();
    let processor = Arc::new(Processor::from_model_dir(&model, None).unwrap());
    let mk = || {
        let inner = open_dataset(data, None, None).unwrap();
        let len = inner.len();
        Box::new(Repeat { inner, n, cache: vec![None; len] }) as Box<dyn RowSource>
    };
    let cfg = LoaderConfig {
        batch_size: bs,
        collator: CollatorConfig { label_mask: mask, add_special_tokens: false, ..Default::default() },
        shuffle: false,
        num_workers: workers,
        prefetch: 4,
        ..Default::default()
    };
    // warm-up (page cache, allocator)
    for b in DataLoader::new(mk(), processor.clone(), LoaderConfig { ..cfg.clone() }, Cursor::default()).take(2) {
        b.unwrap();
    }
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    let mut samples = 0;
    let mut tokens = 0;
    for b in DataLoader::new(mk(), processor.clone(), cfg, Cursor::default()) {
        let b = b.unwrap();
        samples += b.batch_size;
        tokens += b.batch_size * b.seq_len;
    }
    let dt = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    println!(
        "{{\"impl\":\"vsft-data\",\"workers\":{workers},\"samples\":{samples},\"seconds\":{dt:.4},\"samples_per_s\":{:.2},\"cpu_ms_per_sample\":{:.3},\"tokens\":{tokens}}}",
        samples as f64 / dt,
        cpu * 1e3 / samples as f64
    );
}
