//! Per-stage timings of vsft-data on a dataset (debugging aid for the benchmark).
use std::time::Instant;
use vsft_data::dataset::open_dataset;
use vsft_data::image_proc::decode_image;
use vsft_data::{CollatorConfig, Processor};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let p = Processor::from_model_dir(std::path::Path::new(&a[1]), None).unwrap();
    let mut src = open_dataset(&a[2], None, None).unwrap();
    let reps: usize = a.get(3).map(|s| s.parse().unwrap()).unwrap_or(20);
    let rows: Vec<_> = (0..src.len()).map(|i| src.get(i).unwrap()).collect();
    let imgs: Vec<Vec<u8>> = rows.iter().flat_map(|r| r.images.iter().map(|s| s.load().unwrap().to_vec())).collect();
    let t = Instant::now();
    let mut dec = Vec::new();
    for _ in 0..reps {
        dec = imgs.iter().map(|b| decode_image(b).unwrap()).collect();
    }
    let n = (reps * imgs.len()) as f64;
    println!("decode      {:8.3} ms/image", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    let mut rc = Vec::new();
    for _ in 0..reps {
        rc = dec.iter().map(|d| p.image.prepare(d).unwrap()).collect();
    }
    println!("resize+crop {:8.3} ms/image", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(p.image.batch(&rc));
    }
    println!("normalize   {:8.3} ms/image", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    let cfg = CollatorConfig::default();
    let mut counts = Vec::new();
    let mut k = 0;
    for r in &rows {
        counts.push(dec[k..k + r.images.len()].iter().map(|d| p.image.image_tokens(d.height, d.width).unwrap()).collect::<Vec<_>>());
        k += r.images.len();
    }
    for _ in 0..reps {
        for (r, c) in rows.iter().zip(&counts) {
            std::hint::black_box(p.text.encode_images(&r.messages, c, cfg.add_special_tokens, false, None).unwrap());
        }
    }
    println!("text        {:8.3} ms/row", t.elapsed().as_secs_f64() * 1e3 / (reps * rows.len()) as f64);
    let t = Instant::now();
    for _ in 0..reps {
        for r in &rows {
            std::hint::black_box(p.text.render(&r.messages, false).unwrap());
        }
    }
    println!("  render    {:8.3} ms/row", t.elapsed().as_secs_f64() * 1e3 / (reps * rows.len()) as f64);
    let t = Instant::now();
    for _ in 0..reps {
        for r in &rows {
            std::hint::black_box(p.process_row(r, &cfg).unwrap());
        }
    }
    println!("process_row {:8.3} ms/row", t.elapsed().as_secs_f64() * 1e3 / (reps * rows.len()) as f64);
}
