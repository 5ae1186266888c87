//! Image decoding and CLIP preprocessing, equal to transformers' `CLIPImageProcessor`
//! with the PIL backend: convert to RGB (alpha composited onto white exactly like
//! `PIL.Image.alpha_composite`), resize the shortest edge with PIL's BICUBIC
//! (`ImagingResample`, fixed-point 8-bit, horizontal pass first), centre crop, rescale,
//! normalise, CHW `f32`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// An 8-bit RGB image, row-major HWC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3);
        RgbImage { width, height, data }
    }
}

/// `size` in `preprocessor_config.json`: `{"shortest_edge": N}` or `{"height": H, "width": W}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortest_edge: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeOrInt {
    Int(u32),
    Spec(SizeSpec),
}

impl SizeOrInt {
    fn spec(&self, square: bool) -> SizeSpec {
        match self {
            SizeOrInt::Spec(s) => s.clone(),
            SizeOrInt::Int(n) if square => SizeSpec { shortest_edge: None, height: Some(*n), width: Some(*n) },
            SizeOrInt::Int(n) => SizeSpec { shortest_edge: Some(*n), height: None, width: None },
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_resample() -> u32 {
    3
}
fn default_mean() -> Vec<f32> {
    vec![0.48145466, 0.4578275, 0.40821073]
}
fn default_std() -> Vec<f32> {
    vec![0.26862954, 0.26130258, 0.27577711]
}
fn default_size() -> SizeOrInt {
    SizeOrInt::Spec(SizeSpec { shortest_edge: Some(224), height: None, width: None })
}
fn default_crop() -> SizeOrInt {
    SizeOrInt::Spec(SizeSpec { shortest_edge: None, height: Some(224), width: Some(224) })
}

/// Mirrors `preprocessor_config.json` of a CLIP image processor (defaults: transformers'
/// `CLIPImageProcessor` defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: SizeOrInt,
    #[serde(default = "default_resample")]
    pub resample: u32,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    #[serde(default = "default_crop")]
    pub crop_size: SizeOrInt,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_mean")]
    pub image_mean: Vec<f32>,
    #[serde(default = "default_std")]
    pub image_std: Vec<f32>,
    #[serde(default = "default_true")]
    pub do_convert_rgb: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_processor_type: Option<String>,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap()
    }
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json`, or else `processor_config.json`'s `image_processor` entry.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        if pre.exists() {
            return Self::from_file(&pre);
        }
        let proc_path = dir.join("processor_config.json");
        if proc_path.exists() {
            let v = read_json(&proc_path)?;
            if let Some(ip) = v.get("image_processor") {
                return serde_json::from_value(ip.clone())
                    .map_err(|e| DataError::Config { path: proc_path.clone(), msg: format!("image_processor: {e}") });
            }
        }
        Err(DataError::Config {
            path: dir.to_path_buf(),
            msg: "neither preprocessor_config.json nor processor_config.json with an `image_processor` entry".into(),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        serde_json::from_value(v).map_err(|e| DataError::Config { path: path.to_path_buf(), msg: e.to_string() })
    }

    /// (height, width) of the processed image.
    pub fn output_hw(&self) -> Option<(usize, usize)> {
        if self.do_center_crop {
            let c = self.crop_size.spec(true);
            return Some((c.height? as usize, c.width? as usize));
        }
        let s = self.size.spec(false);
        match (s.height, s.width) {
            (Some(h), Some(w)) => Some((h as usize, w as usize)),
            _ => None,
        }
    }

    /// Target (height, width) of the resize step for an input of (h, w), as transformers'
    /// `get_resize_output_image_size(default_to_square=False)` computes it.
    pub fn resize_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let s = self.size.spec(false);
        if let Some(se) = s.shortest_edge {
            let se = se as usize;
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (se as f64 * long as f64 / short as f64) as usize;
            if w <= h {
                (new_long, se)
            } else {
                (se, new_long)
            }
        } else {
            (s.height.unwrap_or(h as u32) as usize, s.width.unwrap_or(w as u32) as usize)
        }
    }
}


/// Largest image file read from disk (`ImageSource::Path`, `vsft generate --image`).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;


/// Largest side of a processed image (`size`, `crop_size`): an 8192² unit is already
/// 3·8192²·4 bytes = 768 MiB of `f32` pixels.
pub const MAX_PROCESSOR_SIDE: u32 = 8192;

impl ImageProcessorConfig {
    /// Checks what the preprocessing will use: three finite means and non-zero finite
    /// standard deviations, a finite rescale factor, and every size between 1 and
    /// `MAX_PROCESSOR_SIDE`. Messages name the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.do_resize && self.resample != 3 {
            return Err(format!("resample={} is not supported (only 3 = BICUBIC)", self.resample));
        }
        for (key, v) in [("image_mean", &self.image_mean), ("image_std", &self.image_std)] {
            if v.len() != 3 || v.iter().any(|x| !x.is_finite()) {
                return Err(format!("{key} must be 3 finite numbers (one per RGB channel), found {v:?}"));
            }
        }
        if self.do_normalize && self.image_std.contains(&0.0) {
            return Err(format!("image_std {:?} has a 0: normalising divides by it", self.image_std));
        }
        if !self.rescale_factor.is_finite() {
            return Err(format!("rescale_factor {} is not a finite number", self.rescale_factor));
        }
        for (key, size, used) in [("size", &self.size, self.do_resize), ("crop_size", &self.crop_size, self.do_center_crop)] {
            let spec = size.spec(key == "crop_size");
            for (field, v) in [("shortest_edge", spec.shortest_edge), ("height", spec.height), ("width", spec.width)] {
                match v {
                    Some(0) if used => return Err(format!("{key}.{field} is 0: an image of no pixels")),
                    Some(n) if used && n > MAX_PROCESSOR_SIDE => {
                        let bytes = 3 * 4 * n as u64 * n as u64;
                        return Err(format!(
                            "{key}.{field} {n} is larger than {MAX_PROCESSOR_SIDE}: one {n}x{n} image alone would be {} MiB of f32 pixels",
                            bytes >> 20
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = crate::guard::read_capped(path, crate::guard::MAX_CONFIG_FILE_BYTES, "a JSON configuration file")?;
    serde_json::from_slice(&bytes).map_err(|e| DataError::Json { path: path.to_path_buf(), msg: e.to_string() })
}

/// Largest image decoded by default, in pixels: Pillow raises `DecompressionBombError`
/// above twice `Image.MAX_IMAGE_PIXELS` (89478485), so nothing larger can reach
/// transformers either. The recipe key `data.max_image_pixels` changes it.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// The message for an image whose header claims more than `limit` pixels.
pub fn too_many_pixels(width: u64, height: u64, limit: u64) -> String {
    format!(
        "the image claims {width}x{height} = {} pixels, more than the limit of {limit} pixels (by default Pillow's decompression-bomb limit); \
         raise it with the recipe key `data.max_image_pixels` (`vsft generate --max-image-pixels`) if the image is genuine",
        width * height
    )
}

/// `decode_image_limited` with the default limit `MAX_IMAGE_PIXELS`.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    decode_image_limited(bytes, MAX_IMAGE_PIXELS)
}

/// Decodes JPEG/PNG/WebP/GIF (first frame) bytes to RGB; alpha is composited onto white
/// exactly as transformers' `convert_to_rgb` (PIL `alpha_composite`) does. An image whose
/// header claims more than `max_pixels` pixels is refused before any pixel buffer is
/// allocated (0 means `MAX_IMAGE_PIXELS`).
pub fn decode_image_limited(bytes: &[u8], max_pixels: u64) -> std::result::Result<RgbImage, String> {
    let max_pixels = if max_pixels == 0 { MAX_IMAGE_PIXELS } else { max_pixels };
    // JPEGs: our libjpeg-turbo-exact decoder (what Pillow uses). Only what it does not
    // implement (12-bit, YCCK, unusual sampling, arithmetic coding) goes to the `image`
    // crate: a file it finds corrupt libjpeg refuses too, and the `image` crate's more
    // lenient decoder would, for instance, zero-fill a truncated scan of any claimed size.
    if bytes.len() > 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 {
        match crate::jpeg::decode(bytes, max_pixels) {
            Ok((w, h, rgb)) => return Ok(RgbImage::new(w, h, rgb)),
            Err(crate::jpeg::JpegError::Unsupported(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    // The `image` crate is third-party: a panic in it is one more decoding error.
    std::panic::catch_unwind(|| decode_with_image_crate(bytes, max_pixels))
        .unwrap_or_else(|_| Err("the image decoder failed on this file (it panicked)".into()))
}

/// The `image` crate's decoders, bounded: the header is read once, its claimed size checked
/// against `max_pixels`, and the decoder told the exact size and allocation it may use.
fn decode_with_image_crate(bytes: &[u8], max_pixels: u64) -> std::result::Result<RgbImage, String> {
    use image::ImageDecoder;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a JPEG, PNG, WebP or GIF image".into());
    }
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    // the largest output is 8 bytes a pixel (RGBA, 16 bits); room for the decoder's own state
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > max_pixels {
        return Err(too_many_pixels(w as u64, h as u64, max_pixels));
    }
    if w == 0 || h == 0 {
        return Err(format!("the image has zero size ({w}x{h})"));
    }
    let img = image::DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
    let (w, h) = (w as usize, h as usize);
    // 16-bit images: Pillow keeps the high byte (the `image` crate would round).
    let high_bytes = |v: &[u16]| -> Vec<u8> { v.iter().map(|&v| (v >> 8) as u8).collect() };
    let (data, channels) = match img {
        image::DynamicImage::ImageRgb16(b) => (high_bytes(b.as_raw()), 3),
        image::DynamicImage::ImageRgba16(b) => (high_bytes(b.as_raw()), 4),
        o if o.color().has_alpha() => (o.to_rgba8().into_raw(), 4),
        o => (o.to_rgb8().into_raw(), 3),
    };
    if channels == 3 {
        return Ok(RgbImage::new(w, h, data));
    }
    let mut out = vec![0u8; w * h * 3];
    for (o, p) in out.chunks_exact_mut(3).zip(data.chunks_exact(4)) {
        o.copy_from_slice(&composite_on_white([p[0], p[1], p[2]], p[3]));
    }
    Ok(RgbImage::new(w, h, out))
}

/// PIL's `ImagingAlphaComposite` (libImaging/AlphaComposite.c) with an opaque white `dst`.
fn composite_on_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    const PB: u32 = 7;
    if a == 0 {
        return [255, 255, 255];
    }
    let sa = a as u32;
    let da = 255u32;
    let blend = da * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PB) / outa255;
    let coef2 = 255 * (1 << PB) - coef1;
    let f = |s: u8| -> u8 {
        let tmp = s as u32 * coef1 + 255 * coef2 + (0x80 << PB);
        let d = ((tmp >> 8) + tmp) >> 8;
        (d >> PB) as u8
    };
    [f(rgb[0]), f(rgb[1]), f(rgb[2])]
}

// ---------------------------------------------------------------------------------------
// PIL ImagingResample (libImaging/Resample.c), 8 bits per channel.

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

struct Coeffs {
    ksize: usize,
    /// (xmin, xmax-count) per output pixel.
    bounds: Vec<(usize, usize)>,
    /// Fixed-point coefficients, `ksize` per output pixel.
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Coeffs {
    let support_base = 2.0f64; // bicubic support
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = support_base * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        let mut ww = 0.0;
        let ss = 1.0 / filterscale;
        // C casts to int truncate toward zero.
        let mut xmin = (center - support + 0.5) as i64;
        if xmin < 0 {
            xmin = 0;
        }
        let mut xmax = (center + support + 0.5) as i64;
        if xmax > in_size as i64 {
            xmax = in_size as i64;
        }
        let xmax = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;
        for x in 0..xmax {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < xmax {
                if ww != 0.0 {
                    k[x] / ww
                } else {
                    k[x]
                }
            } else {
                0.0
            };
            // normalize_coeffs_8bpc
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + v * (1u32 << PRECISION_BITS) as f64) as i32
            } else {
                (0.5 + v * (1u32 << PRECISION_BITS) as f64) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass: input rows `rows`, output columns `cols`; `col_shift` is the first input
/// column present in `src` (coefficient bounds are absolute). Done as a vertical pass on the
/// transposed image, which vectorises (same integer arithmetic, same result).
fn h_pass(src: &RgbImage, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, c: &Coeffs, col_shift: usize) -> RgbImage {
    let t = transpose_rgb(src, rows);
    let w = t.width;
    let r = v_pass(&t, cols, 0..w, c, col_shift);
    transpose_rgb(&r, 0..r.height)
}

/// Rows `rows` of `src`, transposed (pixel (x, y) -> (y - rows.start, x)).
fn transpose_rgb(src: &RgbImage, rows: std::ops::Range<usize>) -> RgbImage {
    let (w, h) = (src.width, rows.len());
    let mut out = vec![0u8; w * h * 3];
    const B: usize = 32;
    for y0 in (0..h).step_by(B) {
        for x0 in (0..w).step_by(B) {
            for y in y0..(y0 + B).min(h) {
                let srow = &src.data[(rows.start + y) * w * 3..(rows.start + y + 1) * w * 3];
                for x in x0..(x0 + B).min(w) {
                    let d = (x * h + y) * 3;
                    out[d..d + 3].copy_from_slice(&srow[x * 3..x * 3 + 3]);
                }
            }
        }
    }
    RgbImage::new(h, w, out)
}

#[inline(always)]
fn v_pass_impl(src: &RgbImage, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, c: &Coeffs, row_shift: usize) -> RgbImage {
    let w = cols.len();
    let out_h = rows.len();
    let mut out: Vec<u8> = Vec::with_capacity(w * out_h * 3);
    let init = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; w * 3];
    for (oy, yy) in rows.enumerate() {
        let (ymin, ymax) = c.bounds[yy];
        let k = &c.kk[yy * c.ksize..yy * c.ksize + ymax];
        acc.iter_mut().for_each(|a| *a = init);
        for (y, &kv) in k.iter().enumerate() {
            let r = ymin - row_shift + y;
            let row = &src.data[(r * src.width + cols.start) * 3..(r * src.width + cols.end) * 3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add((p as i32).wrapping_mul(kv));
            }
        }
        let _ = oy;
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    RgbImage::new(w, out_h, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn v_pass_avx2(src: &RgbImage, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, c: &Coeffs, row_shift: usize) -> RgbImage {
    v_pass_impl(src, rows, cols, c, row_shift)
}

/// Vertical pass: output rows `rows`, input columns `cols` of `src`; `row_shift` is the
/// first input row present in `src`.
fn v_pass(src: &RgbImage, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, c: &Coeffs, row_shift: usize) -> RgbImage {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { v_pass_avx2(src, rows, cols, c, row_shift) };
        }
    }
    v_pass_impl(src, rows, cols, c, row_shift)
}

fn crop_window(src: &RgbImage, cols: std::ops::Range<usize>, rows: std::ops::Range<usize>) -> RgbImage {
    let mut out = Vec::with_capacity(cols.len() * rows.len() * 3);
    for y in rows.clone() {
        out.extend_from_slice(&src.data[(y * src.width + cols.start) * 3..(y * src.width + cols.end) * 3]);
    }
    RgbImage::new(cols.len(), rows.len(), out)
}

/// `PIL.Image.resize((out_w, out_h), Image.BICUBIC)` on an RGB image, bit-exact with
/// Pillow 13's fixed-point implementation.
pub fn resize_bicubic_pil(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bicubic_pil_window(src, out_w, out_h, 0..out_w, 0..out_h)
}

/// The window `cols` x `rows` of `resize_bicubic_pil(src, out_w, out_h)`, computing only
/// what that window needs (every output pixel depends only on its own coefficients, so a
/// centre crop of the resized image can be produced directly).
pub fn resize_bicubic_pil_window(src: &RgbImage, out_w: usize, out_h: usize, cols: std::ops::Range<usize>, rows: std::ops::Range<usize>) -> RgbImage {
    assert!(cols.end <= out_w && rows.end <= out_h && !cols.is_empty() && !rows.is_empty());
    if out_w == src.width && out_h == src.height {
        return crop_window(src, cols, rows);
    }
    let need_h = out_w != src.width;
    let need_v = out_h != src.height;
    let ch = precompute_coeffs(src.width, 0.0, src.width as f32, out_w);
    let cv = precompute_coeffs(src.height, 0.0, src.height as f32, out_h);
    // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height is
    // reduced much more than the width; the order changes the 8-bit intermediate.
    // Rule verified against Pillow 13.0.0 on random sizes.
    let vertical_first = out_h < src.height && (src.height as i64 - out_h as i64) > 2 * (src.width as i64 - out_w as i64);
    let span = |c: &Coeffs, r: &std::ops::Range<usize>| {
        let last = c.bounds[r.end - 1];
        c.bounds[r.start].0..last.0 + last.1
    };
    if vertical_first {
        let in_cols = if need_h { span(&ch, &cols) } else { cols.clone() };
        let shift = in_cols.start;
        let tmp = v_pass(src, rows, in_cols, &cv, 0);
        if need_h {
            let n = tmp.height;
            h_pass(&tmp, 0..n, cols, &ch, shift)
        } else {
            tmp
        }
    } else if need_h {
        let in_rows = if need_v { span(&cv, &rows) } else { rows.clone() };
        let shift = in_rows.start;
        let tmp = h_pass(src, in_rows, cols.clone(), &ch, 0);
        if need_v {
            let w = tmp.width;
            v_pass(&tmp, rows, 0..w, &cv, shift)
        } else {
            tmp
        }
    } else {
        v_pass(src, rows, cols, &cv, 0)
    }
}

/// transformers' `center_crop` (zero-padding when the image is smaller than the crop).
pub fn center_crop(src: &RgbImage, crop_h: usize, crop_w: usize) -> RgbImage {
    let (h, w) = (src.height as i64, src.width as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    if top >= 0 && top + ch <= h && left >= 0 && left + cw <= w {
        let mut out = Vec::with_capacity(crop_h * crop_w * 3);
        for y in top..top + ch {
            let s = ((y * w + left) * 3) as usize;
            out.extend_from_slice(&src.data[s..s + crop_w * 3]);
        }
        return RgbImage::new(crop_w, crop_h, out);
    }
    // Pad to at least the crop size, centred (ceil), then crop.
    let nh = ch.max(h);
    let nw = cw.max(w);
    let top_pad = (nh - h + 1) / 2;
    let left_pad = (nw - w + 1) / 2;
    let mut padded = vec![0u8; (nh * nw * 3) as usize];
    for y in 0..h {
        let d = (((y + top_pad) * nw + left_pad) * 3) as usize;
        let s = (y * w * 3) as usize;
        padded[d..d + (w * 3) as usize].copy_from_slice(&src.data[s..s + (w * 3) as usize]);
    }
    let (t, l) = (top + top_pad, left + left_pad);
    let (t0, t1) = (t.max(0), (t + ch).min(nh));
    let (l0, l1) = (l.max(0), (l + cw).min(nw));
    let mut out = Vec::new();
    for y in t0..t1 {
        let s = ((y * nw + l0) * 3) as usize;
        out.extend_from_slice(&padded[s..s + ((l1 - l0) * 3) as usize]);
    }
    RgbImage::new((l1 - l0) as usize, (t1 - t0) as usize, out)
}

/// Result of preprocessing one image: CHW `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    /// `3 * height * width` values, channel-major.
    pub data: Vec<f32>,
}

impl PixelValues {
    pub fn mean(&self) -> f64 {
        self.data.iter().map(|&v| v as f64).sum::<f64>() / self.data.len().max(1) as f64
    }
    pub fn abs_mean(&self) -> f64 {
        self.data.iter().map(|&v| v.abs() as f64).sum::<f64>() / self.data.len().max(1) as f64
    }
}

/// The CLIP image processor.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig) -> Result<Self> {
        if config.do_resize && config.resample != 3 {
            return Err(DataError::Other(format!(
                "image processor: resample={} is not supported (only 3 = BICUBIC)",
                config.resample
            )));
        }
        config.validate().map_err(|m| DataError::Other(format!("image processor: {m}")))?;
        Ok(ImageProcessor { config })
    }

    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::new(ImageProcessorConfig::from_model_dir(dir)?)
    }

    /// Resize + centre crop on the 8-bit image (only the cropped window is resampled).
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let c = &self.config;
        let crop = if c.do_center_crop {
            let s = c.crop_size.spec(true);
            Some((s.height.unwrap_or(224) as usize, s.width.unwrap_or(224) as usize))
        } else {
            None
        };
        if !c.do_resize {
            return match crop {
                Some((ch, cw)) if (ch, cw) != (img.height, img.width) => center_crop(img, ch, cw),
                _ => img.clone(),
            };
        }
        let (h, w) = c.resize_hw(img.height, img.width);
        match crop {
            Some((ch, cw)) if ch <= h && cw <= w => {
                let top = (h - ch) / 2;
                let left = (w - cw) / 2;
                resize_bicubic_pil_window(img, w, h, left..left + cw, top..top + ch)
            }
            Some((ch, cw)) => center_crop(&resize_bicubic_pil(img, w, h), ch, cw),
            None => resize_bicubic_pil(img, w, h),
        }
    }

    /// Full preprocessing of a decoded RGB image to CHW floats.
    pub fn preprocess(&self, img: &RgbImage) -> PixelValues {
        let cur = self.resize_and_crop(img);
        let mut data = Vec::with_capacity(3 * cur.height * cur.width);
        self.normalize_into(&cur, &mut data);
        PixelValues { height: cur.height, width: cur.width, data }
    }

    /// Rescale + normalise an already resized and cropped image, appending its CHW planes
    /// to `out` (no intermediate buffer).
    pub fn normalize_into(&self, cur: &RgbImage, out: &mut Vec<f32>) {
        let lut = self.normalize_lut();
        for (ch, l) in lut.iter().enumerate() {
            out.extend(cur.data.chunks_exact(3).map(|p| l[p[ch] as usize]));
        }
    }

    /// Per channel, the rescaled and normalised value of every 8-bit level:
    /// `f32(f64(v)·rescale_factor)`, then `(x − mean) / std` in f32 (transformers' PIL backend).
    pub fn normalize_lut(&self) -> [[f32; 256]; 3] {
        let c = &self.config;
        let mut lut = [[0f32; 256]; 3];
        for (ch, l) in lut.iter_mut().enumerate() {
            for (v, o) in l.iter_mut().enumerate() {
                let mut x = v as f32;
                if c.do_rescale {
                    x = (v as f64 * c.rescale_factor) as f32;
                }
                if c.do_normalize {
                    x = (x - c.image_mean[ch]) / c.image_std[ch];
                }
                *o = x;
            }
        }
        lut
    }

    /// Decode + preprocess.
    pub fn process_bytes(&self, bytes: &[u8]) -> std::result::Result<PixelValues, String> {
        let img = decode_image(bytes)?;
        Ok(self.preprocess(&img))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: usize, h: usize, seed: u32) -> RgbImage {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        let data = (0..w * h * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        RgbImage::new(w, h, data)
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        for (i, &(w, h, ow, oh)) in [(50, 40, 30, 20), (40, 90, 20, 36), (30, 20, 70, 50), (64, 64, 64, 30), (64, 64, 30, 64), (21, 77, 9, 33)].iter().enumerate() {
            let src = noise(w, h, i as u32 + 1);
            let full = resize_bicubic_pil(&src, ow, oh);
            for (x0, x1, y0, y1) in [(0, ow, 0, oh), (1, ow - 1, 2, oh - 1), (ow / 3, ow / 2 + 1, oh / 4, oh / 2 + 1)] {
                let win = resize_bicubic_pil_window(&src, ow, oh, x0..x1, y0..y1);
                assert_eq!(win, crop_window(&full, x0..x1, y0..y1), "{w}x{h}->{ow}x{oh} window {x0}..{x1} {y0}..{y1}");
            }
        }
    }

    #[test]
    fn alpha_composite_matches_pil_extremes() {
        assert_eq!(composite_on_white([10, 20, 30], 255), [10, 20, 30]);
        assert_eq!(composite_on_white([10, 20, 30], 0), [255, 255, 255]);
    }
}
