//! Images: the JPEG decoder against libjpeg-turbo (Pillow) on every kind of JPEG Pillow
//! writes (tests/fixtures/jpeg, scripts/make_jpeg_fixtures.py), and no input, however
//! broken, makes decoding panic, run long or allocate what a header claims: seeded
//! mutations of the fixtures, decompression bombs, endless files.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use vsft_data::image_proc::{decode_image, decode_image_limited, MAX_IMAGE_PIXELS};
use vsft_data::jpeg;

/// Counts the bytes each thread holds, and its peak, so a test can check what one decode
/// allocated (tests run on several threads).
struct PerThreadCount;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|l| {
        l.set(l.get() + size);
        let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for PerThreadCount {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note_free(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: PerThreadCount = PerThreadCount;

/// Runs `f`, returning its result and the most bytes this thread held above what it held
/// before.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(|p| p.get()) - base)
}

fn fx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/jpeg")
}

fn manifest() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fx().join("manifest.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["files"].as_array().unwrap().clone()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fx().join(name)).unwrap()
}

#[test]
fn every_kind_pillow_writes_decodes_bit_exact() {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for e in manifest().iter().filter(|e| e.get("sha256").is_some()) {
        let name = e["file"].as_str().unwrap();
        let kind = e["kind"].as_str().unwrap();
        let bytes = fixture(name);
        // every kind goes through our decoder, not the `image` crate fallback
        if let Err(err) = jpeg::decode(&bytes, MAX_IMAGE_PIXELS) {
            panic!("{name} ({kind}): our decoder refuses it: {err}");
        }
        let img = decode_image(&bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!((img.width as u64, img.height as u64), (e["width"].as_u64().unwrap(), e["height"].as_u64().unwrap()), "{name}");
        assert_eq!(common::sha256(&img.data), e["sha256"].as_str().unwrap(), "{name} ({kind}): not Pillow's pixels");
        *kinds.entry(kind.to_string()).or_default() += 1;
    }
    eprintln!("bit-exact with Pillow: {kinds:?}");
    for k in ["baseline", "progressive", "grayscale", "CMYK", "subsampling 4:4:0", "subsampling 4:2:2", "restart interval (blocks)", "16-bit quantization tables"] {
        assert!(kinds.contains_key(k), "no {k} fixture");
    }
}

/// xorshift64*: the mutation test's seeded choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// (marker, offset of the marker, segment length) of each length-carrying JPEG segment
/// before the first scan's data.
fn jpeg_segments(d: &[u8]) -> Vec<(u8, usize, usize)> {
    let mut out = Vec::new();
    let mut i = 2;
    while i + 4 <= d.len() && d[i] == 0xFF {
        let (m, len) = (d[i + 1], u16::from_be_bytes([d[i + 2], d[i + 3]]) as usize);
        out.push((m, i, len));
        if m == 0xDA {
            break;
        }
        i += 2 + len;
    }
    out
}

/// One seeded mutation of `d`, and what it was.
fn mutate(d: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut m = d.to_vec();
    let segs = if d.starts_with(&[0xFF, 0xD8]) { jpeg_segments(d) } else { Vec::new() };
    let seg = |rng: &mut Rng, marker: Option<u8>| {
        let pick: Vec<_> = segs.iter().filter(|s| marker.is_none_or(|k| s.0 == k)).collect();
        (!pick.is_empty()).then(|| *pick[rng.below(pick.len())])
    };
    let what = match rng.below(9) {
        0 => {
            let (p, bit) = (rng.below(m.len()), rng.below(8));
            m[p] ^= 1 << bit;
            format!("bit {bit} of byte {p} flipped")
        }
        1 => {
            let (p, v) = (rng.below(m.len()), [0x00, 0xFF, rng.below(256) as u8][rng.below(3)]);
            m[p] = v;
            format!("byte {p} set to {v:#04x}")
        }
        2 => {
            let n = rng.below(m.len());
            m.truncate(n);
            format!("truncated to {n} bytes")
        }
        3 => match seg(rng, None) {
            Some((k, p, len)) => {
                let lie = [0usize, 1, 2, len.saturating_sub(1), len + 1, len + 100, 0xFFFF][rng.below(7)];
                m[p + 2..p + 4].copy_from_slice(&(lie as u16).to_be_bytes());
                format!("segment {k:#04x} length {len} -> {lie}")
            }
            None => {
                // other formats: a header field set huge (PNG IHDR / GIF screen / WebP sizes)
                let p = (8 + rng.below(24)).min(m.len() - 1);
                m[p] = 0xFF;
                format!("header byte {p} set to 0xff")
            }
        },
        4 => match seg(rng, Some(0xC4)) {
            Some((_, p, _)) if rng.below(2) == 0 => {
                let k = p + 5 + rng.below(16);
                let v = [0xFF, 0x80, rng.below(256) as u8, m[k].wrapping_add(1)][rng.below(4)];
                m[k] = v;
                format!("Huffman count at {k} set to {v}")
            }
            Some((_, p, _)) => {
                // codes moved to a shorter length, the total kept: a table that overflows
                let counts = p + 5..p + 21;
                let long = counts.clone().rev().find(|&k| m[k] > 0).unwrap_or(p + 20);
                let short = p + 5 + rng.below(long - p - 4);
                let n = 1 + rng.below(m[long].max(1) as usize) as u8;
                m[long] = m[long].saturating_sub(n);
                m[short] = m[short].wrapping_add(n);
                format!("{n} Huffman codes moved from length {} to {}", long - p - 4, short - p - 4)
            }
            None => {
                m.truncate(m.len() * 2 / 3);
                "two thirds kept".into()
            }
        },
        5 => match segs.iter().find(|s| matches!(s.0, 0xC0..=0xC2)) {
            Some(&(_, p, _)) => {
                let (h, w) = ([0, 1, 4000, 13000, 60000, 65535][rng.below(6)], [0, 1, 4000, 13000, 60000, 65535][rng.below(6)]);
                m[p + 5..p + 7].copy_from_slice(&(h as u16).to_be_bytes());
                m[p + 7..p + 9].copy_from_slice(&(w as u16).to_be_bytes());
                format!("SOF size -> {w}x{h}")
            }
            None => {
                let p = rng.below(m.len());
                m[p] = m[p].wrapping_add(0x80);
                format!("byte {p} + 0x80")
            }
        },
        6 => match seg(rng, None) {
            Some((k, p, len)) => {
                let copy = m[p..(p + 2 + len).min(m.len())].to_vec();
                let at = [p, p + 2 + len][rng.below(2)].min(m.len());
                let times = 1 + rng.below(40);
                for _ in 0..times {
                    m.splice(at..at, copy.iter().copied());
                }
                format!("segment {k:#04x} duplicated {times} times")
            }
            None => {
                let (a, n) = (rng.below(m.len()), rng.below(64));
                let copy = m[a..(a + n).min(m.len())].to_vec();
                m.splice(a..a, copy);
                format!("{n} bytes at {a} repeated")
            }
        },
        7 => match seg(rng, Some(0xDA)) {
            // the scan header: component count, ids, table ids, spectral selection
            Some((_, p, len)) => {
                let k = (p + 4 + rng.below(len.saturating_sub(2).max(1))).min(m.len() - 1);
                let v = rng.below(256) as u8;
                m[k] = v;
                format!("SOS byte at {k} set to {v}")
            }
            None => {
                let p = rng.below(m.len());
                m[p] ^= 0xFF;
                format!("byte {p} inverted")
            }
        },
        _ => {
            // several flips at once in the entropy-coded data
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let p = m.len() / 2 + rng.below(m.len() / 2);
                m[p] = rng.below(256) as u8;
            }
            format!("{n} bytes in the second half randomised")
        }
    };
    (m, what)
}

/// Mutations must decode or fail quickly; a limit of 4 Mpx keeps every success small.
const MUTATION_LIMIT: u64 = 1 << 22;

#[test]
fn mutated_images_never_panic_and_stay_bounded() {
    let seeds: Vec<String> = manifest().iter().map(|e| e["file"].as_str().unwrap().to_string()).collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut errors, mut fallback_panics) = (0, 0, Vec::new());
    for case in 0..420 {
        let name = &seeds[rng.below(seeds.len())];
        let (bytes, what) = mutate(&fixture(name), &mut rng);
        let label = format!("case {case}: {name}: {what}");
        if bytes.starts_with(&[0xFF, 0xD8]) {
            // our own decoder must not need the safety net
            let own = std::panic::catch_unwind(|| jpeg::decode(&bytes, MUTATION_LIMIT));
            assert!(own.is_ok(), "{label}: the JPEG decoder panicked");
        }
        let (res, peak) = peak_alloc(|| std::panic::catch_unwind(|| decode_image_limited(&bytes, MUTATION_LIMIT)));
        let res = res.unwrap_or_else(|_| panic!("{label}: decode_image panicked"));
        // planes, coefficients and the RGB output of at most MUTATION_LIMIT pixels
        assert!(peak <= 64 * MUTATION_LIMIT as usize, "{label}: {peak} bytes allocated");
        match res {
            Ok(img) => {
                assert!((img.width * img.height) as u64 <= MUTATION_LIMIT && img.width * img.height > 0, "{label}: {}x{}", img.width, img.height);
                assert_eq!(img.data.len(), img.width * img.height * 3, "{label}");
                ok += 1;
            }
            Err(e) => {
                assert!(!e.trim().is_empty(), "{label}: an empty error");
                if e.contains("panicked") {
                    fallback_panics.push(label);
                }
                errors += 1;
            }
        }
    }
    eprintln!("{ok} decoded, {errors} refused; the image crate panicked on {}: {fallback_panics:#?}", fallback_panics.len());
    assert!(ok > 50 && errors > 50, "the mutations should mix decodable and broken files: {ok} / {errors}");
}

/// `baseline_photo.jpg` with its frame claiming `w`x`h`.
fn claiming(name: &str, w: u16, h: u16) -> Vec<u8> {
    let mut d = fixture(name);
    let &(_, p, _) = jpeg_segments(&d).iter().find(|s| matches!(s.0, 0xC0..=0xC2)).unwrap();
    d[p + 5..p + 7].copy_from_slice(&h.to_be_bytes());
    d[p + 7..p + 9].copy_from_slice(&w.to_be_bytes());
    d
}

#[test]
fn decompression_bombs_are_refused_from_the_header() {
    let cases = [
        ("baseline 60000x60000", claiming("baseline_photo.jpg", 60000, 60000), "60000x60000"),
        ("progressive 65535x65535", claiming("progressive_photo.jpg", 65535, 65535), "65535x65535"),
        ("CMYK 65535x65535", claiming("cmyk_photo.jpg", 65535, 65535), "65535x65535"),
        ("16-bit tables 30000x30000", claiming("qtables16_photo.jpg", 30000, 30000), "30000x30000"),
    ];
    for (what, bytes, claim) in cases {
        let (res, peak) = peak_alloc(|| decode_image(&bytes));
        let e = res.err().unwrap_or_else(|| panic!("{what}: decoded"));
        assert!(e.contains(claim) && e.contains(&MAX_IMAGE_PIXELS.to_string()) && e.contains("data.max_image_pixels"), "{what}: {e}");
        assert!(peak < 1 << 20, "{what}: {peak} bytes allocated before refusing");
    }
    // GIF (logical screen and frame) and lossless WebP (14-bit sizes) headers
    let mut gif = fixture("seed.gif");
    gif[6..10].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let frame = gif.iter().position(|&b| b == 0x2C).unwrap();
    gif[frame + 5..frame + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let mut webp = fixture("seed_lossless.webp");
    let vp8l = webp.windows(4).position(|w| w == b"VP8L").unwrap() + 9;
    webp[vp8l..vp8l + 4].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0x0F]); // 16384 x 16384
    for (what, bytes) in [("GIF", gif), ("WebP", webp)] {
        let (res, peak) = peak_alloc(|| decode_image(&bytes));
        let e = res.err().unwrap_or_else(|| panic!("{what}: decoded"));
        assert!(!e.is_empty(), "{what}");
        assert!(peak < 64 << 20, "{what}: {peak} bytes allocated: {e}");
    }
    // the limit is the caller's: the same photo under a small limit, and 0 for the default
    let photo = fixture("baseline_photo.jpg");
    let e = decode_image_limited(&photo, 100).unwrap_err();
    assert!(e.contains("160x120") && e.contains("limit of 100 pixels"), "{e}");
    let e = decode_image_limited(&fixture("seed_rgb.png"), 100).unwrap_err();
    assert!(e.contains("33x31") && e.contains("limit of 100 pixels"), "{e}");
    assert!(decode_image_limited(&photo, 0).is_ok());
}

#[test]
fn large_claims_with_little_data_end_quickly() {
    // 4000x4000 is under the limit: data that ends (end of file) inside the scan is an error
    // at once, as Pillow's "image file is truncated"
    // (the progressive file's refinement scans lose their sync with the new block layout
    // first: some other corruption)
    for (name, why) in [("baseline_photo.jpg", "truncated"), ("restart_rows_photo.jpg", "truncated"), ("progressive_photo.jpg", "corrupt JPEG")] {
        let mut d = claiming(name, 4000, 4000);
        d.truncate(d.len() - 2); // no EOI
        let e = decode_image(&d).err().unwrap_or_else(|| panic!("{name}: decoded"));
        assert!(e.contains(why), "{name}: {e}");
    }
    // ending at a marker, libjpeg (and Pillow) fill the rest of the scan with zeros: once
    let img = decode_image(&claiming("baseline_photo.jpg", 4000, 4000)).unwrap();
    assert_eq!((img.width, img.height), (4000, 4000));
    // but many scans ending at once cannot each fill the frame
    let d = claiming("progressive_photo.jpg", 4000, 4000);
    let &(_, sos, len) = jpeg_segments(&d).iter().find(|s| s.0 == 0xDA).unwrap();
    let mut many = d[..sos].to_vec();
    for _ in 0..200 {
        many.extend_from_slice(&d[sos..sos + 2 + len]);
    }
    many.extend_from_slice(&[0xFF, 0xD9]);
    let e = decode_image(&many).err().expect("200 empty scans decoded");
    assert!(e.contains("marker"), "{e}");
}

#[test]
fn endless_files_are_read_up_to_a_limit() {
    let src = vsft_data::ImageSource::Path(PathBuf::from("/dev/zero"));
    let e = src.load().unwrap_err().to_string();
    assert!(e.contains("/dev/zero") && e.contains("256 MiB"), "{e}");
    let e = vsft_data::ImageProcessorConfig::from_file(Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(e.contains("/dev/zero") && e.contains("16 MiB"), "{e}");
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The image processor JSON of `dir` with `patch` merged in, through the family selection
/// (as `preprocessor_config.json` would be read).
fn with_patch(dir: &Path, patch: serde_json::Value) -> Result<vsft_data::VisionProcessor, String> {
    let path = dir.join("preprocessor_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, x) in patch.as_object().unwrap() {
        v[k] = x.clone();
    }
    let res = std::panic::catch_unwind(|| vsft_data::VisionProcessor::from_value(dir, &v, &path));
    match res.unwrap_or_else(|_| panic!("{patch}: panicked")) {
        Ok(p) => Ok(p),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn processor_configs_are_validated_on_load() {
    use serde_json::json;
    let llava = fixtures().join("data/model");
    let next = fixtures().join("llava_next/data/processor");
    let qwen = fixtures().join("qwen_vl/data/processor");
    let cases = [
        (&llava, json!({"crop_size": {"height": 0, "width": 0}}), "crop_size.height is 0"),
        (&llava, json!({"crop_size": 100000}), "crop_size.height 100000 is larger than 8192"),
        (&llava, json!({"size": {"shortest_edge": 0}}), "size.shortest_edge is 0"),
        (&llava, json!({"size": {"shortest_edge": 50000}}), "size.shortest_edge 50000"),
        (&llava, json!({"image_std": [0.0, 0.2, 0.2]}), "image_std"),
        (&llava, json!({"image_mean": [0.5, 0.5]}), "image_mean"),
        (&next, json!({"image_grid_pinpoints": []}), "image_grid_pinpoints"),
        (&next, json!({"image_grid_pinpoints": [[0, 336]]}), "image_grid_pinpoints"),
        (&next, json!({"image_grid_pinpoints": [[336, 1000000]]}), "image_grid_pinpoints"),
        (&next, json!({"crop_size": {"height": 0, "width": 0}}), "crop_size.height is 0"),
        (&next, json!({"image_std": [1.0, 0.0, 1.0]}), "image_std"),
        (&qwen, json!({"patch_size": 0}), "patch_size"),
        (&qwen, json!({"merge_size": 1000}), "merge_size 1000"),
        (&qwen, json!({"temporal_patch_size": 0}), "temporal_patch_size"),
        (&qwen, json!({"min_pixels": 1000000000u64, "max_pixels": 1000000}), "min_pixels / max_pixels"),
        (&qwen, json!({"max_pixels": 1000000000000u64}), "max_pixels 1000000000000"),
        (&qwen, json!({"image_std": [0.0, 0.0, 0.0]}), "image_std"),
    ];
    for (dir, patch, key) in cases {
        let e = with_patch(dir, patch.clone()).err().unwrap_or_else(|| panic!("{patch}: accepted"));
        assert!(e.contains("preprocessor_config.json") && e.contains(key), "{patch}: {e}");
    }
    for dir in [&llava, &next, &qwen] {
        assert!(with_patch(dir, json!({})).is_ok(), "{}", dir.display());
    }
}

#[test]
fn a_resize_of_a_very_thin_image_is_refused_not_attempted() {
    // LLaVA's shortest-edge resize of a 1-pixel-wide image (a PNG may be 1 x 10^8 pixels)
    let p = vsft_data::VisionProcessor::from_model_dir(&fixtures().join("data/model")).unwrap();
    let e = p.meta(10_000_000, 1).err().expect("a 1x10^7 image resized to shortest edge 84").to_string();
    assert!(e.contains("1x10000000") && e.contains(&MAX_IMAGE_PIXELS.to_string()), "{e}");
    assert!(p.meta(1000, 1).is_ok());
}

#[test]
fn a_row_over_the_pixel_limit_is_a_corrupt_image_row() {
    use vsft_data::{BadRowKind, ImageSource, Processor, ProcessorOverrides, Row};
    let overrides = ProcessorOverrides { max_image_pixels: Some(1000), ..Default::default() };
    let p = Processor::from_model_dir_with(&fixtures().join("data/model"), None, &overrides).unwrap();
    assert_eq!(p.max_image_pixels, 1000);
    let row = Row {
        index: 0,
        file: PathBuf::from("rows.parquet"),
        file_row: 7,
        messages: vec![],
        images: vec![ImageSource::Bytes(std::sync::Arc::new(fixture("baseline_photo.jpg")))],
    };
    let e = p.decode_row_images(&row).err().expect("a 160x120 image under a 1000-pixel limit");
    assert_eq!(e.bad_row_kind(), Some(BadRowKind::CorruptImage));
    let msg = e.to_string();
    assert!(msg.contains("rows.parquet") && msg.contains("row 7") && msg.contains("images[0]") && msg.contains("limit of 1000 pixels"), "{msg}");
    // the default is Pillow's
    let p = Processor::from_model_dir(&fixtures().join("data/model"), None).unwrap();
    assert_eq!(p.max_image_pixels, MAX_IMAGE_PIXELS);
    assert_eq!(p.decode_row_images(&row).unwrap()[0].width, 160);
}
