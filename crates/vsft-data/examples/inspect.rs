//! `vsft data inspect` stand-in: inspect MODEL_DIR DATA [pad|pad+image|assistant] [LIMIT] [--json]
use vsft_data::inspect::{inspect, summarize, InspectOptions};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut o = InspectOptions::new(&a[1], a[2].clone());
    if let Some(m) = a.get(3) {
        o.label_mask = m.parse().unwrap();
    }
    o.limit = a.get(4).map(|s| s.parse().unwrap());
    let json = a.iter().any(|x| x == "--json");
    let (ex, skipped) = inspect(&o).unwrap();
    for e in &ex {
        if json {
            println!("{}", e.to_json_line());
        } else {
            print!("{}", e.to_text());
        }
    }
    eprintln!("skipped: {}", skipped.report());
    eprint!("{}", summarize(&o, 2).unwrap().to_text());
}
