//! Images: seeded mutations of real photographs and of every JPEG kind in the fixtures, every
//! format's decompression bomb (a small file whose header claims billions of pixels), and
//! reads that never end. Each is one row of a LLaVA-JSON dataset read by `vsft data inspect`
//! through each family's processor.

use std::path::{Path, PathBuf};

use crate::common::root;
use crate::{args, endless, replace, scratch, Case, Rng};

const RANDOM_MUTATIONS: usize = 260;

/// The processors the rows go through: LLaVA (resize + crop), LLaVA-NeXT (tiles), Qwen (patches).
fn processors() -> Vec<PathBuf> {
    let f = root().join("tests/fixtures");
    vec![f.join("data/model"), f.join("llava_next/data/processor"), f.join("qwen_vl/data/processor")]
}

fn base_images() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["tests/fixtures/data/images", "tests/fixtures/data/jpeg"] {
        let mut files: Vec<_> = std::fs::read_dir(root().join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for p in files {
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// A one-row dataset whose image is `image` (a file name in `dir`, or an absolute path).
fn row_case(dir: &Path, name: String, image: &str, processor: &Path) -> Case {
    let data = dir.join("data.json");
    let row = serde_json::json!([{
        "id": "r0",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A picture."}
        ]
    }]);
    std::fs::write(&data, row.to_string()).unwrap();
    Case::new("images", name, args!["data", "inspect", "--limit", "1", "--model", processor, "--data", &data], data.to_string_lossy())
}

/// The byte ranges of a JPEG's marker segments `(marker, start of payload, end)`.
fn jpeg_segments(b: &[u8]) -> Vec<(u8, usize, usize)> {
    let mut out = Vec::new();
    let mut i = 2;
    while i + 4 <= b.len() && b[i] == 0xFF {
        let marker = b[i + 1];
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        out.push((marker, i + 4, (i + 2 + len).min(b.len())));
        if marker == 0xDA {
            break;
        }
        i += 2 + len;
    }
    out
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    let n = bytes.len();
    let segs = if bytes.starts_with(&[0xFF, 0xD8]) { jpeg_segments(bytes) } else { Vec::new() };
    match rng.below(8) {
        0 => {
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let i = rng.below(n);
                bytes[i] ^= 1 << rng.below(8);
            }
            format!("{k} bit flips")
        }
        1 => {
            let at = rng.below(n);
            bytes.truncate(at);
            format!("truncated at {at}")
        }
        2 => {
            let at = rng.below(n);
            let len = (1 + rng.below(64)).min(n - at);
            let v = *rng.pick(&[0x00, 0xFF, 0x7F, 0x80]);
            bytes[at..at + len].fill(v);
            format!("{len} bytes at {at} set to {v:#x}")
        }
        3 => {
            let at = rng.below(n);
            let len = (1 + rng.below(256)).min(n - at);
            let chunk = bytes[at..at + len].to_vec();
            let to = rng.below(n);
            bytes.splice(to..to, chunk);
            format!("{len} bytes from {at} repeated at {to}")
        }
        // JPEG headers: lie in a table, a length, a count or a size.
        _ if !segs.is_empty() => {
            let (marker, start, end) = *rng.pick(&segs);
            if end <= start {
                bytes.truncate(start);
                return format!("segment {marker:#x} cut");
            }
            let i = start + rng.below(end - start);
            let v = *rng.pick(&[0x00, 0xFF, 0x10, 0x11, 0x44, 0x05, 0xF0]);
            bytes[i] = v;
            format!("segment {marker:#x} byte {} set to {v:#x}", i - start)
        }
        _ => {
            let i = rng.below(n.min(64));
            bytes[i] = rng.next() as u8;
            format!("header byte {i} randomised")
        }
    }
}

/// Sets a JPEG's frame size (SOF0/SOF1/SOF2) to `w`×`h`.
fn jpeg_claiming(bytes: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let (_, start, _) = *jpeg_segments(&b).iter().find(|(m, _, _)| matches!(m, 0xC0 | 0xC1 | 0xC2)).expect("a frame header");
    b[start + 1..start + 3].copy_from_slice(&h.to_be_bytes());
    b[start + 3..start + 5].copy_from_slice(&w.to_be_bytes());
    b
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG whose IHDR (with a valid CRC) claims `w`×`h`, followed by a tiny IDAT.
fn png_claiming(bytes: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut b = bytes.to_vec();
    // IHDR: 8-byte signature, 4-byte length, "IHDR", width, height, …, CRC over type+data.
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

/// A GIF whose logical screen and first image claim `w`×`h`.
fn gif_claiming(bytes: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[6..8].copy_from_slice(&w.to_le_bytes());
    b[8..10].copy_from_slice(&h.to_le_bytes());
    if let Some(i) = b.iter().position(|&x| x == 0x2C) {
        if i + 9 <= b.len() {
            b[i + 5..i + 7].copy_from_slice(&w.to_le_bytes());
            b[i + 7..i + 9].copy_from_slice(&h.to_le_bytes());
        }
    }
    b
}

/// A WebP with an extended header (VP8X) whose canvas claims `w`×`h` around the original frame.
fn webp_claiming(bytes: &[u8], w: u32, h: u32) -> Vec<u8> {
    let body = &bytes[12..];
    let mut vp8x = b"VP8X".to_vec();
    vp8x.extend_from_slice(&10u32.to_le_bytes());
    vp8x.extend_from_slice(&[0, 0, 0, 0]);
    vp8x.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((4 + vp8x.len() + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&vp8x);
    out.extend_from_slice(body);
    out
}

pub fn cases() -> Vec<Case> {
    let dir = scratch("images");
    let bases = base_images();
    let procs = processors();
    let mut rng = Rng::new(13);
    let mut cases = Vec::new();

    for k in 0..RANDOM_MUTATIONS {
        let (name, bytes) = rng.pick(&bases);
        let mut b = bytes.clone();
        let what = mutate(&mut rng, &mut b);
        let d = dir.join(format!("m{k}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("image.bin"), &b).unwrap();
        let proc_dir = &procs[k % procs.len()];
        cases.push(row_case(&d, format!("{name}: {what}"), "image.bin", proc_dir).may_succeed());
    }

    let file = |n: &str| bases.iter().find(|(b, _)| b == n).unwrap_or_else(|| panic!("no base image {n}")).1.clone();
    let bombs: Vec<(&str, Vec<u8>)> = vec![
        ("baseline JPEG claiming 60000x60000", jpeg_claiming(&file("chelsea.jpg"), 60000, 60000)),
        ("progressive JPEG claiming 65535x65535", jpeg_claiming(&file("progressive.jpg"), 65535, 65535)),
        ("baseline JPEG claiming 65535x3000", jpeg_claiming(&file("s420.jpg"), 65535, 3000)),
        ("grayscale JPEG claiming 20000x20000", jpeg_claiming(&file("gray.jpg"), 20000, 20000)),
        ("PNG claiming 100000x100000", png_claiming(&file("small.png"), 100_000, 100_000)),
        ("PNG claiming 2^31x1", png_claiming(&file("small.png"), 1 << 31, 1)),
        ("GIF claiming 65535x65535", gif_claiming(&file("tiny.gif"), 65535, 65535)),
        ("WebP claiming 16000x16000", webp_claiming(&file("tiny.webp"), 16000, 16000)),
    ];
    for (k, (what, b)) in bombs.into_iter().enumerate() {
        let d = dir.join(format!("bomb{k}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("image.bin"), &b).unwrap();
        for p in &procs {
            cases.push(row_case(&d, format!("bomb: {what} via {}", p.display()), "image.bin", p));
        }
    }

    let d = dir.join("special");
    std::fs::create_dir_all(&d).unwrap();
    replace(&d.join("empty.jpg"), b"");
    replace(&d.join("text.png"), b"this is not an image\n");
    replace(&d.join("jpeg_soi_only.jpg"), [0xFF, 0xD8]);
    endless(&d.join("zero.jpg"));
    let specials = [("empty file", "empty.jpg"), ("text file", "text.png"), ("JPEG start marker only", "jpeg_soi_only.jpg"), ("/dev/zero", "zero.jpg"), ("a missing file", "missing.jpg")];
    for (k, (what, image)) in specials.iter().enumerate() {
        let dk = d.join(format!("s{k}"));
        std::fs::create_dir_all(&dk).unwrap();
        cases.push(row_case(&dk, format!("special: {what}"), d.join(image).to_str().unwrap(), &procs[0]));
    }
    cases
}
