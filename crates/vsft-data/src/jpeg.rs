//! A JPEG decoder that reproduces libjpeg-turbo's default output (what Pillow gives) for
//! 8-bit baseline, extended and progressive Huffman files: grayscale, YCbCr (or RGB) with
//! 4:4:4, 4:2:2, 4:2:0 or 4:4:0 sampling, and unsubsampled CMYK: `jpeg_idct_islow`, fancy
//! upsampling (h2v1, h2v2, h1v2) with libjpeg's edge and context-row rules, the
//! table-driven YCbCr->RGB conversion, Pillow's CMYK->RGB. Other valid files (YCCK, 12-bit,
//! arithmetic coding, unusual sampling) return `Unsupported` so the caller can fall back to
//! another decoder.
//!
//! Every number read from the file is checked before it is used: table ids, segment
//! lengths, component counts, sampling factors and Huffman code counts. The claimed size is
//! checked against the caller's pixel limit before any buffer is allocated, and the work is
//! bounded: entropy-coded data that ends (end of file) before its scan does is an error, as
//! in Pillow ("image file is truncated"); zero-filling after a premature marker (libjpeg's
//! behaviour) is allowed for at most one frame's worth of blocks; and all scans together
//! may visit at most `MAX_BLOCK_PASSES` times the frame's blocks.

use std::fmt;

#[derive(Debug)]
pub enum JpegError {
    /// Valid JPEG features this decoder does not implement (arithmetic coding, YCCK...).
    Unsupported(String),
    Corrupt(String),
    /// More pixels than the caller's limit (by default Pillow's decompression-bomb limit).
    TooLarge(String),
}

impl fmt::Display for JpegError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JpegError::Unsupported(m) => write!(f, "unsupported JPEG: {m}"),
            JpegError::Corrupt(m) => write!(f, "corrupt JPEG: {m}"),
            JpegError::TooLarge(m) => f.write_str(m),
        }
    }
}

type R<T> = Result<T, JpegError>;

fn corrupt<T>(m: impl Into<String>) -> R<T> {
    Err(JpegError::Corrupt(m.into()))
}

/// All scans of a file together may visit each block of the frame at most this many times
/// (progressive files from libjpeg / Pillow use about 10 scans): many scans over a large
/// frame cannot turn a small file into minutes of work.
pub const MAX_BLOCK_PASSES: usize = 64;

const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

#[derive(Clone, Default)]
struct Huffman {
    // (code length, code) -> symbol via canonical tables
    maxcode: [i32; 18],
    valptr: [i32; 17],
    mincode: [i32; 17],
    vals: Vec<u8>,
    // fast lookup for codes up to 9 bits: (len, symbol), len 0 = slow path
    fast: Vec<(u8, u8)>,
}

const FAST_BITS: usize = 9;

impl Huffman {
    /// The decoding tables of one DHT table. Refuses what libjpeg's `jpeg_make_d_derived_tbl`
    /// refuses: more than 256 symbols, code counts that are not a prefix code (the codes of
    /// length l must fit in l bits and not be all ones), DC symbols above 15.
    fn new(counts: &[u8; 16], vals: Vec<u8>, is_dc: bool) -> R<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total > 256 {
            return corrupt(format!("Huffman table with {total} codes (at most 256)"));
        }
        if vals.len() < total {
            return corrupt(format!("Huffman table with {total} codes but {} symbols", vals.len()));
        }
        if is_dc && vals[..total].iter().any(|&v| v > 15) {
            return corrupt("DC Huffman table with a symbol above 15");
        }
        let mut h = Huffman { vals, ..Default::default() };
        let mut code = 0i32;
        let mut k = 0i32;
        for l in 1..=16 {
            let n = counts[l - 1] as i32;
            h.valptr[l] = k;
            h.mincode[l] = code;
            code += n;
            k += n;
            if code >= 1 << l {
                return corrupt(format!("Huffman table whose codes of length {l} do not fit in {l} bits"));
            }
            h.maxcode[l] = if n > 0 { code - 1 } else { -1 };
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        // Every code of length l <= FAST_BITS is below 2^l (checked above), so the entries
        // filled stay below 2^FAST_BITS.
        h.fast = vec![(0, 0); 1 << FAST_BITS];
        let mut code = 0u32;
        let mut p = 0usize;
        for l in 1..=FAST_BITS {
            for _ in 0..counts[l - 1] {
                let shift = FAST_BITS - l;
                for j in 0..(1u32 << shift) {
                    h.fast[((code << shift) | j) as usize] = (l as u8, h.vals[p]);
                }
                p += 1;
                code += 1;
            }
            code <<= 1;
        }
        Ok(h)
    }
}

/// Where the entropy-coded data of a scan ended, once the bit reader has fed zeros past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataEnd {
    /// At a marker: libjpeg feeds zeros for the rest of the scan (and Pillow accepts it).
    Marker,
    /// At the end of the file: Pillow refuses it ("image file is truncated").
    Eof,
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
    /// Set once the data of the scan has ended: zeros are fed from then on.
    end: Option<DataEnd>,
    /// Zero bytes fed after the end (some stay unread in `acc`: only those consumed matter).
    pad_bytes: u64,
    /// Progressive scans: blocks left in the current end-of-band run (reset at restarts
    /// with the rest of the entropy decoder's state).
    eobrun: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits { data, pos, acc: 0, nbits: 0, end: None, pad_bytes: 0, eobrun: 0 }
    }
    /// The next data byte, or where the data ends (libjpeg's `jpeg_fill_bit_buffer`: a run
    /// of 0xFF then 0x00 is one 0xFF byte; 0xFF then anything else is a marker).
    fn next_byte(&mut self) -> Result<u8, DataEnd> {
        let &b = self.data.get(self.pos).ok_or(DataEnd::Eof)?;
        if b != 0xFF {
            self.pos += 1;
            return Ok(b);
        }
        let mut p = self.pos + 1;
        while self.data.get(p) == Some(&0xFF) {
            p += 1;
        }
        match self.data.get(p) {
            Some(0) => {
                self.pos = p + 1;
                Ok(0xFF)
            }
            Some(_) => Err(DataEnd::Marker),
            None => Err(DataEnd::Eof),
        }
    }
    fn fill(&mut self) {
        while self.nbits <= 56 {
            let byte = match self.end {
                Some(_) => None,
                None => match self.next_byte() {
                    Ok(b) => Some(b),
                    Err(end) => {
                        self.end = Some(end);
                        None
                    }
                },
            };
            if byte.is_none() {
                self.pad_bytes += 1;
            }
            self.acc |= (byte.unwrap_or(0) as u64) << (56 - self.nbits);
            self.nbits += 8;
        }
    }
    /// Where the data ended, if bits past its end have been consumed.
    fn past_end(&self) -> Option<DataEnd> {
        if self.pad_bytes * 8 > self.nbits as u64 {
            self.end
        } else {
            None
        }
    }
    fn peek(&mut self, n: u32) -> u32 {
        if self.nbits < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.nbits -= n;
    }
    fn get(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }
    fn decode(&mut self, h: &Huffman) -> R<u8> {
        let p = self.peek(FAST_BITS as u32) as usize;
        let (l, s) = h.fast[p];
        if l > 0 {
            self.consume(l as u32);
            return Ok(s);
        }
        let mut code = self.get(1) as i32;
        let mut l = 1;
        while code > h.maxcode[l] {
            code = (code << 1) | self.get(1) as i32;
            l += 1;
            if l > 16 {
                return corrupt("a Huffman code that is not in its table");
            }
        }
        let idx = (h.valptr[l] + code - h.mincode[l]) as usize;
        h.vals.get(idx).copied().ok_or_else(|| JpegError::Corrupt("a Huffman code that is not in its table".into()))
    }
    fn receive_extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let v = self.get(s) as i32;
        if v < (1 << (s - 1)) {
            v - (1 << s) + 1
        } else {
            v
        }
    }
    /// Skips to after the next RSTn marker.
    fn restart(&mut self) {
        self.acc = 0;
        self.nbits = 0;
        self.end = None;
        self.pad_bytes = 0;
        self.eobrun = 0;
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[self.pos + 1]) {
                self.pos += 2;
                return;
            }
            if self.data[self.pos] == 0xFF && self.data[self.pos + 1] != 0 && self.data[self.pos + 1] != 0xFF {
                // another marker: leave it (libjpeg would resync); the scan reads zeros
                return;
            }
            self.pos += 1;
        }
    }
}

#[derive(Clone)]
struct Comp {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// The quantization table, latched when the component first appears in a scan (as
    /// libjpeg does: a later DQT does not change it).
    quant: Option<[u16; 64]>,
    // plane of samples, padded to whole MCUs
    stride: usize,
    rows: usize,
    data: Vec<u8>,
    dc_pred: i32,
    td: usize,
    ta: usize,
    /// downsampled size (libjpeg's downsampled_width/height)
    dw: usize,
    dh: usize,
}

impl Comp {
    /// Blocks of the padded plane.
    fn blocks(&self) -> usize {
        (self.stride / 8) * (self.rows / 8)
    }

    /// The DC prediction plus a decoded difference; libjpeg-turbo refuses an overflow
    /// (JERR_BAD_DCT_COEF).
    fn add_dc(&mut self, diff: i32) -> R<()> {
        self.dc_pred = self.dc_pred.checked_add(diff).ok_or_else(|| JpegError::Corrupt("DC coefficient overflow".into()))?;
        Ok(())
    }
}

/// The work the scans of a file may still cause (see the module doc).
struct Budget {
    block_visits: usize,
    padded_blocks: usize,
}

impl Budget {
    fn new(frame_blocks: usize) -> Self {
        Budget { block_visits: MAX_BLOCK_PASSES.saturating_mul(frame_blocks), padded_blocks: frame_blocks }
    }

    /// Accounts for one MCU of `blocks` blocks just decoded by `bits`.
    fn spend(&mut self, blocks: usize, bits: &Bits) -> R<()> {
        self.block_visits = self.block_visits.checked_sub(blocks).ok_or_else(|| {
            JpegError::Corrupt(format!("the scans visit the frame's blocks more than {MAX_BLOCK_PASSES} times"))
        })?;
        match bits.past_end() {
            None => Ok(()),
            Some(DataEnd::Eof) => corrupt("truncated: the file ends inside the entropy-coded data of a scan"),
            Some(DataEnd::Marker) => {
                self.padded_blocks = self.padded_blocks.checked_sub(blocks).ok_or_else(|| {
                    JpegError::Corrupt("the entropy-coded data stops at a marker before its scans end, for more than the frame's blocks".into())
                })?;
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// jidctint.c jpeg_idct_islow

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
// i32 arithmetic (wrapping) as libjpeg-turbo's SIMD islow, bit-exact for 8-bit data.
type W = std::num::Wrapping<i32>;
const fn w(x: i32) -> W {
    std::num::Wrapping(x)
}
const FIX_0_298631336: W = w(2446);
const FIX_0_390180644: W = w(3196);
const FIX_0_541196100: W = w(4433);
const FIX_0_765366865: W = w(6270);
const FIX_0_899976223: W = w(7373);
const FIX_1_175875602: W = w(9633);
const FIX_1_501321110: W = w(12299);
const FIX_1_847759065: W = w(15137);
const FIX_1_961570560: W = w(16069);
const FIX_2_053119869: W = w(16819);
const FIX_2_562915447: W = w(20995);
const FIX_3_072711026: W = w(25172);

#[inline(always)]
fn descale(x: W, n: u32) -> W {
    w((x + w(1 << (n - 1))).0 >> n)
}

#[inline(always)]
fn range_limit_idct(x: W) -> u8 {
    let t = x.0 & 1023;
    let s = (t ^ 512) - 512; // sign-extend 10 bits
    (s + 128).clamp(0, 255) as u8
}

#[inline(always)]
fn idct_islow_impl(coef: &[i32; 64], q: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [w(0); 64];
    for c in 0..8 {
        let deq = |r: usize| w(coef[r * 8 + c]) * w(q[r * 8 + c] as i32);
        if (1..8).all(|r| coef[r * 8 + c] == 0) {
            let dc = deq(0) << PASS1_BITS as usize;
            for r in 0..8 {
                ws[r * 8 + c] = dc;
            }
            continue;
        }
        let z2 = deq(2);
        let z3 = deq(6);
        let z1 = (z2 + z3) * FIX_0_541196100;
        let tmp2 = z1 - z3 * FIX_1_847759065;
        let tmp3 = z1 + z2 * FIX_0_765366865;
        let z2 = deq(0);
        let z3 = deq(4);
        let tmp0 = (z2 + z3) << CONST_BITS as usize;
        let tmp1 = (z2 - z3) << CONST_BITS as usize;
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        let (t0, t1, t2, t3) = odd(deq(7), deq(5), deq(3), deq(1));
        let n = CONST_BITS - PASS1_BITS;
        ws[c] = descale(tmp10 + t3, n);
        ws[7 * 8 + c] = descale(tmp10 - t3, n);
        ws[8 + c] = descale(tmp11 + t2, n);
        ws[6 * 8 + c] = descale(tmp11 - t2, n);
        ws[2 * 8 + c] = descale(tmp12 + t1, n);
        ws[5 * 8 + c] = descale(tmp12 - t1, n);
        ws[3 * 8 + c] = descale(tmp13 + t0, n);
        ws[4 * 8 + c] = descale(tmp13 - t0, n);
    }
    for r in 0..8 {
        let wr = &ws[r * 8..r * 8 + 8];
        let o = &mut out[r * stride..r * stride + 8];
        if wr[1..].iter().all(|x| x.0 == 0) {
            let v = range_limit_idct(descale(wr[0], PASS1_BITS + 3));
            o.iter_mut().for_each(|x| *x = v);
            continue;
        }
        let z2 = wr[2];
        let z3 = wr[6];
        let z1 = (z2 + z3) * FIX_0_541196100;
        let tmp2 = z1 - z3 * FIX_1_847759065;
        let tmp3 = z1 + z2 * FIX_0_765366865;
        let tmp0 = (wr[0] + wr[4]) << CONST_BITS as usize;
        let tmp1 = (wr[0] - wr[4]) << CONST_BITS as usize;
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        let (t0, t1, t2, t3) = odd(wr[7], wr[5], wr[3], wr[1]);
        let n = CONST_BITS + PASS1_BITS + 3;
        o[0] = range_limit_idct(descale(tmp10 + t3, n));
        o[7] = range_limit_idct(descale(tmp10 - t3, n));
        o[1] = range_limit_idct(descale(tmp11 + t2, n));
        o[6] = range_limit_idct(descale(tmp11 - t2, n));
        o[2] = range_limit_idct(descale(tmp12 + t1, n));
        o[5] = range_limit_idct(descale(tmp12 - t1, n));
        o[3] = range_limit_idct(descale(tmp13 + t0, n));
        o[4] = range_limit_idct(descale(tmp13 - t0, n));
    }
}

fn idct_islow(coef: &[i32; 64], q: &[u16; 64], out: &mut [u8], stride: usize) {
    idct_islow_impl(coef, q, out, stride)
}

#[inline(always)]
fn odd(tmp0: W, tmp1: W, tmp2: W, tmp3: W) -> (W, W, W, W) {
    let z1 = tmp0 + tmp3;
    let z2 = tmp1 + tmp2;
    let z3 = tmp0 + tmp2;
    let z4 = tmp1 + tmp3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let mut t0 = tmp0 * FIX_0_298631336;
    let mut t1 = tmp1 * FIX_2_053119869;
    let mut t2 = tmp2 * FIX_3_072711026;
    let mut t3 = tmp3 * FIX_1_501321110;
    let z1 = -(z1 * FIX_0_899976223);
    let z2 = -(z2 * FIX_2_562915447);
    let mut z3 = -(z3 * FIX_1_961570560);
    let mut z4 = -(z4 * FIX_0_390180644);
    z3 += z5;
    z4 += z5;
    t0 += z1 + z3;
    t1 += z2 + z4;
    t2 += z2 + z3;
    t3 += z1 + z4;
    (t0, t1, t2, t3)
}

// ---------------------------------------------------------------------------------------

/// Decodes a JPEG to RGB (grayscale replicated), bit-exact with libjpeg-turbo's defaults.
/// Frames of more than `max_pixels` pixels are refused (`TooLarge`) before any buffer is
/// allocated. Returns (width, height, rgb).
pub fn decode(data: &[u8], max_pixels: u64) -> R<(usize, usize, Vec<u8>)> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return corrupt("not a JPEG (no SOI marker)");
    }
    let mut pos = 2;
    let mut qt = [[0u16; 64]; 4];
    let mut qt_defined = [false; 4];
    let mut dc_tables: [Option<Huffman>; 4] = Default::default();
    let mut ac_tables: [Option<Huffman>; 4] = Default::default();
    let mut comps: Vec<Comp> = Vec::new();
    let (mut width, mut height) = (0usize, 0usize);
    let mut restart_interval = 0usize;
    let mut adobe_transform: Option<u8> = None;
    let mut jfif = false;
    let mut frame_seen = false;
    let (mut hmax, mut vmax) = (1, 1);
    let (mut mcux, mut mcuy) = (0, 0);
    let mut scans = 0;
    let mut progressive = false;
    let mut budget = Budget::new(0);
    // progressive: coefficients per component (natural order, 64 per block, padded grid),
    // JCOEF-sized as in libjpeg
    let mut coefs: Vec<Vec<i16>> = Vec::new();
    loop {
        // find marker
        while pos < data.len() && data[pos] != 0xFF {
            pos += 1;
        }
        while pos < data.len() && data[pos] == 0xFF {
            pos += 1;
        }
        if pos >= data.len() {
            if scans > 0 {
                break;
            }
            return corrupt("the file ends before any scan");
        }
        let m = data[pos];
        pos += 1;
        if m == 0xD9 {
            break;
        }
        if (0xD0..=0xD7).contains(&m) || m == 0x01 {
            continue;
        }
        if pos + 2 > data.len() {
            return corrupt(format!("the file ends inside the length of marker 0x{m:02X}"));
        }
        let len = u16::from_be_bytes([data[pos], data[pos + 1]]) as usize;
        if len < 2 || pos + len > data.len() {
            return corrupt(format!("marker 0x{m:02X} claims {len} bytes; {} are left", data.len() - pos));
        }
        let seg = &data[pos + 2..pos + len];
        pos += len;
        match m {
            0xDB => {
                let mut s = seg;
                while let Some(&pqtq) = s.first() {
                    let (pq, tq) = (pqtq >> 4, (pqtq & 15) as usize);
                    if tq > 3 || pq > 1 {
                        return corrupt(format!("DQT: table {tq} of precision {pq} (tables 0..=3, precision 0 or 1)"));
                    }
                    let n = if pq == 0 { 64 } else { 128 };
                    if s.len() < 1 + n {
                        return corrupt(format!("DQT: table {tq} needs {n} bytes; {} are left", s.len() - 1));
                    }
                    for k in 0..64 {
                        let v = if pq == 0 { s[1 + k] as u16 } else { u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]]) };
                        qt[tq][ZIGZAG[k]] = v;
                    }
                    qt_defined[tq] = true;
                    s = &s[1 + n..];
                }
            }
            0xC4 => {
                let mut s = seg;
                while !s.is_empty() {
                    if s.len() < 17 {
                        return corrupt(format!("DHT: a table header needs 17 bytes; {} are left", s.len()));
                    }
                    let tc = s[0] >> 4;
                    let th = (s[0] & 15) as usize;
                    if th > 3 || tc > 1 {
                        return corrupt(format!("DHT: table class {tc} id {th} (class 0 or 1, ids 0..=3)"));
                    }
                    let mut counts = [0u8; 16];
                    counts.copy_from_slice(&s[1..17]);
                    let total: usize = counts.iter().map(|&c| c as usize).sum();
                    if s.len() < 17 + total {
                        return corrupt(format!("DHT: table of {total} codes; {} symbol bytes are left", s.len() - 17));
                    }
                    let h = Huffman::new(&counts, s[17..17 + total].to_vec(), tc == 0)?;
                    if tc == 0 {
                        dc_tables[th] = Some(h);
                    } else {
                        ac_tables[th] = Some(h);
                    }
                    s = &s[17 + total..];
                }
            }
            0xDD => {
                if seg.len() < 2 {
                    return corrupt("DRI segment shorter than 2 bytes");
                }
                restart_interval = u16::from_be_bytes([seg[0], seg[1]]) as usize;
            }
            0xE0 => {
                if seg.starts_with(b"JFIF\0") {
                    jfif = true;
                }
            }
            0xEE => {
                if seg.len() >= 12 && seg.starts_with(b"Adobe") {
                    adobe_transform = Some(seg[11]);
                }
            }
            0xC0..=0xC2 => {
                progressive = m == 0xC2;
                if frame_seen {
                    return corrupt("two frames (SOF markers)");
                }
                frame_seen = true;
                if seg.len() < 6 {
                    return corrupt(format!("SOF segment of {} bytes (at least 6)", seg.len()));
                }
                height = u16::from_be_bytes([seg[1], seg[2]]) as usize;
                width = u16::from_be_bytes([seg[3], seg[4]]) as usize;
                let pixels = width as u64 * height as u64;
                if pixels > max_pixels {
                    return Err(JpegError::TooLarge(crate::image_proc::too_many_pixels(width as u64, height as u64, max_pixels)));
                }
                if seg[0] != 8 {
                    return Err(JpegError::Unsupported(format!("{}-bit samples", seg[0])));
                }
                if width == 0 || height == 0 {
                    return Err(JpegError::Unsupported("zero size or DNL".into()));
                }
                let nc = seg[5] as usize;
                if !matches!(nc, 1 | 3 | 4) || seg.len() < 6 + 3 * nc {
                    return Err(JpegError::Unsupported(format!("{nc} components")));
                }
                for k in 0..nc {
                    let c = &seg[6 + 3 * k..9 + 3 * k];
                    let (h, v) = ((c[1] >> 4) as usize, (c[1] & 15) as usize);
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
                        return corrupt(format!("SOF component {}: sampling {h}x{v}, quantization table {} (sampling 1..=4, tables 0..=3)", c[0], c[2]));
                    }
                    if comps.iter().any(|o| o.id == c[0]) {
                        return corrupt(format!("SOF lists component {} twice", c[0]));
                    }
                    comps.push(Comp { id: c[0], h, v, tq: c[2] as usize, quant: None, stride: 0, rows: 0, data: vec![], dc_pred: 0, td: 0, ta: 0, dw: 0, dh: 0 });
                }
                if nc == 1 {
                    // a single component is never subsampled
                    comps[0].h = 1;
                    comps[0].v = 1;
                } else {
                    hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
                    vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
                    let y = &comps[0];
                    // no subsampling, or (three components) the luma at 2x1, 1x2 or 2x2
                    let luma_only = nc == 3 && y.h == hmax && y.v == vmax && comps[1..].iter().all(|c| c.h == 1 && c.v == 1) && hmax <= 2 && vmax <= 2;
                    if (hmax, vmax) != (1, 1) && !luma_only {
                        let f: Vec<String> = comps.iter().map(|c| format!("{}x{}", c.h, c.v)).collect();
                        return Err(JpegError::Unsupported(format!("sampling factors {}", f.join(", "))));
                    }
                }
                mcux = width.div_ceil(8 * hmax);
                mcuy = height.div_ceil(8 * vmax);
                for c in comps.iter_mut() {
                    c.stride = mcux * c.h * 8;
                    c.rows = mcuy * c.v * 8;
                    c.data = vec![0u8; c.stride * c.rows];
                    if progressive {
                        coefs.push(vec![0i16; c.blocks() * 64]);
                    }
                    c.dw = (width * c.h).div_ceil(hmax);
                    c.dh = (height * c.v).div_ceil(vmax);
                }
                budget = Budget::new(comps.iter().map(Comp::blocks).sum());
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(JpegError::Unsupported(format!("SOF{} (lossless, hierarchical or arithmetic coding)", m - 0xC0)));
            }
            0xDA => {
                if !frame_seen {
                    return corrupt("scan (SOS) before the frame (SOF)");
                }
                let ns = seg.first().copied().unwrap_or(0) as usize;
                if ns == 0 || ns > comps.len() || seg.len() < 1 + 2 * ns + 3 {
                    return corrupt(format!("SOS of {} bytes for {ns} components (the frame has {})", seg.len(), comps.len()));
                }
                let mut sc: Vec<usize> = Vec::new();
                for k in 0..ns {
                    let cid = seg[1 + 2 * k];
                    let t = seg[2 + 2 * k];
                    let ci = comps.iter().position(|c| c.id == cid).ok_or_else(|| JpegError::Corrupt(format!("SOS names component {cid}, which the frame does not have")))?;
                    if sc.contains(&ci) {
                        return corrupt(format!("SOS lists component {cid} twice"));
                    }
                    let c = &mut comps[ci];
                    (c.td, c.ta) = ((t >> 4) as usize, (t & 15) as usize);
                    if c.td > 3 || c.ta > 3 {
                        return corrupt(format!("SOS: Huffman tables {} / {} for component {cid} (ids 0..=3)", c.td, c.ta));
                    }
                    if c.quant.is_none() {
                        if !qt_defined[c.tq] {
                            return corrupt(format!("quantization table {} of component {cid} is not defined", c.tq));
                        }
                        c.quant = Some(qt[c.tq]);
                    }
                    sc.push(ci);
                }
                for c in comps.iter_mut() {
                    c.dc_pred = 0;
                }
                let scan = Scan { data, pos, comps: &sc, dc_tables: &dc_tables, ac_tables: &ac_tables, restart_interval, mcux, mcuy };
                if progressive {
                    let t = &seg[1 + 2 * ns..];
                    let (ss, se, ah, al) = (t[0] as usize, t[1] as usize, (t[2] >> 4) as u32, (t[2] & 15) as u32);
                    if se > 63 || ss > se || (ss == 0 && se != 0) || (ss > 0 && ns != 1) || al > 13 {
                        return corrupt(format!("progressive scan Ss={ss} Se={se} Ah={ah} Al={al} with {ns} components"));
                    }
                    let prm = ProgScan { ss, se, ah, al };
                    pos = decode_scan_progressive(&scan, &mut comps, &mut coefs, &prm, &mut budget)?;
                } else {
                    pos = decode_scan(&scan, &mut comps, &mut budget)?;
                }
                scans += 1;
            }
            _ => {}
        }
    }
    if !frame_seen || scans == 0 {
        return corrupt("no frame or no scan before the end (EOI)");
    }
    if progressive {
        for (c, cf) in comps.iter_mut().zip(&coefs) {
            // a component no scan named has no latched table and all-zero coefficients
            let q = c.quant.unwrap_or([0; 64]);
            let bw = c.stride / 8;
            let mut blk = [0i32; 64];
            for (b, block) in cf.chunks_exact(64).enumerate() {
                let (bx, by) = (b % bw, b / bw);
                blk.iter_mut().zip(block).for_each(|(d, &s)| *d = s as i32);
                let off = by * 8 * c.stride + bx * 8;
                let stride = c.stride;
                idct_islow(&blk, &q, &mut c.data[off..], stride);
            }
        }
    }
    if comps.len() == 1 {
        let c = &comps[0];
        let mut out = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for &v in &c.data[y * c.stride..y * c.stride + width] {
                out.extend_from_slice(&[v, v, v]);
            }
        }
        return Ok((width, height, out));
    }
    if comps.len() == 4 {
        // libjpeg: four components are YCCK with an Adobe transform other than 0
        if adobe_transform.is_some_and(|t| t != 0) {
            return Err(JpegError::Unsupported("YCCK colour".into()));
        }
        return Ok((width, height, cmyk_to_rgb(&comps, width, height)));
    }
    // colour transform: JFIF / Adobe transform 1 / default => YCbCr; Adobe 0 or ids 'R','G','B' => RGB
    let rgb_ids = comps[0].id == b'R' && comps[1].id == b'G' && comps[2].id == b'B';
    let is_ycc = match adobe_transform {
        Some(t) => t != 0,
        None => jfif || !rgb_ids,
    };
    let planes: Vec<Vec<u8>> = comps.iter().map(|c| upsample(c, hmax, vmax, width, height)).collect();
    let mut out = vec![0u8; width * height * 3];
    if !is_ycc {
        for i in 0..width * height {
            out[3 * i] = planes[0][i];
            out[3 * i + 1] = planes[1][i];
            out[3 * i + 2] = planes[2][i];
        }
        return Ok((width, height, out));
    }
    ycc_to_rgb(&planes[0], &planes[1], &planes[2], &mut out);
    Ok((width, height, out))
}

/// What Pillow makes of a four-component JPEG: the samples read as Adobe's inverted CMYK
/// (rawmode "CMYK;I"), then `convert("RGB")` (libImaging's `cmyk2rgb`:
/// `R = (255 - K) - MULDIV255(C, 255 - K)`). Unsubsampled planes.
fn cmyk_to_rgb(comps: &[Comp], width: usize, height: usize) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let row = |ci: usize| &comps[ci].data[y * comps[ci].stride..y * comps[ci].stride + width];
        let (c, m, ye, k) = (row(0), row(1), row(2), row(3));
        for x in 0..width {
            // inverted samples: 255 - raw is the ink, and the raw K is 255 - K
            let nk = k[x] as u32;
            for ink in [c[x], m[x], ye[x]] {
                out.push((nk - muldiv255(255 - ink as u32, nk)) as u8);
            }
        }
    }
    out
}

// jdcolor.c's tables, computed inline (identical values; vectorisable).
const FIX_1_40200: i32 = 91881; // FIX(1.40200) = (int)(1.402 * 65536 + 0.5)
const FIX_1_77200: i32 = 116130;
const FIX_0_71414: i32 = 46802;
const FIX_0_34414: i32 = 22554;

#[inline(always)]
fn ycc_to_rgb_impl(yp: &[u8], cbp: &[u8], crp: &[u8], out: &mut [u8]) {
    const HALF: i32 = 1 << 15;
    for (((o, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(yp).zip(cbp).zip(crp) {
        let (y, cb, cr) = (y as i32, cb as i32 - 128, cr as i32 - 128);
        let r = y + ((FIX_1_40200 * cr + HALF) >> 16);
        let g = y + ((-FIX_0_34414 * cb + HALF - FIX_0_71414 * cr) >> 16);
        let b = y + ((FIX_1_77200 * cb + HALF) >> 16);
        o[0] = r.clamp(0, 255) as u8;
        o[1] = g.clamp(0, 255) as u8;
        o[2] = b.clamp(0, 255) as u8;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn ycc_to_rgb_avx2(yp: &[u8], cbp: &[u8], crp: &[u8], out: &mut [u8]) {
    ycc_to_rgb_impl(yp, cbp, crp, out)
}

fn ycc_to_rgb(yp: &[u8], cbp: &[u8], crp: &[u8], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { ycc_to_rgb_avx2(yp, cbp, crp, out) };
        }
    }
    ycc_to_rgb_impl(yp, cbp, crp, out)
}

#[allow(dead_code)]
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i64; 256],
    cb_g: [i64; 256],
}

#[allow(dead_code)]
fn ycc_tables() -> YccTables {
    const SCALEBITS: i64 = 16;
    const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
    let fix = |x: f64| (x * (1i64 << SCALEBITS) as f64 + 0.5) as i64;
    let mut t = YccTables { cr_r: [0; 256], cb_b: [0; 256], cr_g: [0; 256], cb_g: [0; 256] };
    for i in 0..256 {
        let x = i as i64 - 128;
        t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
        t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
        t.cr_g[i] = -fix(0.71414) * x;
        t.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
    }
    t
}

fn upsample(c: &Comp, hmax: usize, vmax: usize, width: usize, height: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { upsample_avx2(c, hmax, vmax, width, height) };
        }
    }
    upsample_impl(c, hmax, vmax, width, height)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn upsample_avx2(c: &Comp, hmax: usize, vmax: usize, width: usize, height: usize) -> Vec<u8> {
    upsample_impl(c, hmax, vmax, width, height)
}

/// libjpeg-turbo's fancy upsampling of one component to full size (cropped to width x height).
#[inline(always)]
fn upsample_impl(c: &Comp, hmax: usize, vmax: usize, width: usize, height: usize) -> Vec<u8> {
    let (hf, vf) = (hmax / c.h, vmax / c.v);
    let mut out = vec![0u8; width * height];
    let row = |r: usize| -> &[u8] {
        let r = r.min(c.dh - 1);
        &c.data[r * c.stride..r * c.stride + c.dw]
    };
    let dw = c.dw;
    match (hf, vf) {
        (1, 1) => {
            for y in 0..height {
                out[y * width..(y + 1) * width].copy_from_slice(&row(y)[..width]);
            }
        }
        (2, 1) => {
            let mut tmp = vec![0u8; dw * 2];
            for y in 0..height {
                let inp = row(y);
                if dw > 2 {
                    h2v1_fancy(inp, &mut tmp);
                } else {
                    for (k, &v) in inp.iter().enumerate() {
                        tmp[2 * k] = v;
                        tmp[2 * k + 1] = v;
                    }
                }
                out[y * width..(y + 1) * width].copy_from_slice(&tmp[..width]);
            }
        }
        (1, 2) => {
            for y in 0..height {
                let r = y / 2;
                let inp0 = row(r);
                let (inp1, bias) = if y % 2 == 0 { (row(r.saturating_sub(1)), 1) } else { (row(r + 1), 2) };
                let o = &mut out[y * width..(y + 1) * width];
                if dw > 2 {
                    for x in 0..width {
                        o[x] = ((inp0[x] as i32 * 3 + inp1[x] as i32 + bias) >> 2) as u8;
                    }
                } else {
                    o.copy_from_slice(&inp0[..width]);
                }
            }
        }
        (2, 2) => {
            let mut tmp = vec![0u8; dw * 2];
            for y in 0..height {
                let r = y / 2;
                let inp0 = row(r);
                if dw > 2 {
                    let inp1 = if y % 2 == 0 { row(r.saturating_sub(1)) } else { row(r + 1) };
                    h2v2_fancy_row(inp0, inp1, &mut tmp);
                } else {
                    for (k, &v) in inp0.iter().enumerate() {
                        tmp[2 * k] = v;
                        tmp[2 * k + 1] = v;
                    }
                }
                out[y * width..(y + 1) * width].copy_from_slice(&tmp[..width]);
            }
        }
        _ => unreachable!(),
    }
    out
}

#[inline(always)]
fn h2v1_fancy(inp: &[u8], out: &mut [u8]) {
    let n = inp.len();
    let v = inp[0] as i32;
    out[0] = v as u8;
    out[1] = ((v * 3 + inp[1] as i32 + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let v = inp[i] as i32 * 3;
        out[2 * i] = ((v + inp[i - 1] as i32 + 1) >> 2) as u8;
        out[2 * i + 1] = ((v + inp[i + 1] as i32 + 2) >> 2) as u8;
    }
    let v = inp[n - 1] as i32;
    out[2 * (n - 1)] = ((v * 3 + inp[n - 2] as i32 + 1) >> 2) as u8;
    out[2 * (n - 1) + 1] = v as u8;
}

#[inline(always)]
fn h2v2_fancy_row(inp0: &[u8], inp1: &[u8], out: &mut [u8]) {
    let n = inp0.len();
    let col: Vec<i32> = inp0.iter().zip(inp1).map(|(&a, &b)| a as i32 * 3 + b as i32).collect();
    out[0] = ((col[0] * 4 + 8) >> 4) as u8;
    out[1] = ((col[0] * 3 + col[1] + 7) >> 4) as u8;
    for ((o, w), i) in out[2..2 * (n - 1)].chunks_exact_mut(2).zip(col.windows(3)).zip(1..) {
        let _ = i;
        let this = w[1] * 3;
        o[0] = ((this + w[0] + 8) >> 4) as u8;
        o[1] = ((this + w[2] + 7) >> 4) as u8;
    }
    out[2 * (n - 1)] = ((col[n - 1] * 3 + col[n - 2] + 8) >> 4) as u8;
    out[2 * (n - 1) + 1] = ((col[n - 1] * 4 + 7) >> 4) as u8;
}

/// What a scan decoder needs besides the components: the file from the scan's first
/// entropy-coded byte, the components of the scan (indices into the frame's), the tables.
struct Scan<'a> {
    data: &'a [u8],
    pos: usize,
    comps: &'a [usize],
    dc_tables: &'a [Option<Huffman>; 4],
    ac_tables: &'a [Option<Huffman>; 4],
    restart_interval: usize,
    mcux: usize,
    mcuy: usize,
}

impl Scan<'_> {
    /// The MCU grid: a one-component scan is non-interleaved (one block per MCU over the
    /// component's own extent); otherwise the frame's MCUs.
    fn grid(&self, comps: &[Comp]) -> (usize, usize) {
        match self.comps {
            &[ci] => (comps[ci].dw.div_ceil(8), comps[ci].dh.div_ceil(8)),
            _ => (self.mcux, self.mcuy),
        }
    }

    /// Blocks in one MCU of this scan.
    fn mcu_blocks(&self, comps: &[Comp]) -> usize {
        match self.comps {
            &[_] => 1,
            sc => sc.iter().map(|&ci| comps[ci].h * comps[ci].v).sum(),
        }
    }

    fn dc_table(&self, c: &Comp) -> R<&Huffman> {
        self.dc_tables[c.td].as_ref().ok_or_else(|| JpegError::Corrupt(format!("DC Huffman table {} of component {} is not defined", c.td, c.id)))
    }

    fn ac_table(&self, c: &Comp) -> R<&Huffman> {
        self.ac_tables[c.ta].as_ref().ok_or_else(|| JpegError::Corrupt(format!("AC Huffman table {} of component {} is not defined", c.ta, c.id)))
    }
}

/// The position after the entropy-coded data: the next marker that is not RSTn.
fn scan_end(data: &[u8], from: usize) -> usize {
    let mut p = from.min(data.len());
    while p + 1 < data.len() {
        if data[p] == 0xFF && data[p + 1] != 0 && !(0xD0..=0xD7).contains(&data[p + 1]) && data[p + 1] != 0xFF {
            break;
        }
        p += 1;
    }
    p
}

/// Runs `block(bits, component, component index, block x, block y)` on every block of the
/// scan in MCU order, with the restart intervals and the work budget; returns the position
/// after the scan's entropy-coded data.
fn for_each_block(scan: &Scan, comps: &mut [Comp], budget: &mut Budget, mut block: impl FnMut(&mut Bits, &mut Comp, usize, usize, usize) -> R<()>) -> R<usize> {
    let mut bits = Bits::new(scan.data, scan.pos);
    let (nx, ny) = scan.grid(comps);
    let mcu_blocks = scan.mcu_blocks(comps);
    for m in 0..nx * ny {
        if scan.restart_interval > 0 && m > 0 && m % scan.restart_interval == 0 {
            bits.restart();
            for &ci in scan.comps {
                comps[ci].dc_pred = 0;
            }
        }
        let (mx, my) = (m % nx, m / nx);
        match scan.comps {
            &[ci] => block(&mut bits, &mut comps[ci], ci, mx, my)?,
            sc => {
                for &ci in sc {
                    let (h, v) = (comps[ci].h, comps[ci].v);
                    for yy in 0..v {
                        for xx in 0..h {
                            block(&mut bits, &mut comps[ci], ci, mx * h + xx, my * v + yy)?;
                        }
                    }
                }
            }
        }
        budget.spend(mcu_blocks, &bits)?;
    }
    Ok(scan_end(scan.data, bits.pos))
}

/// One scan of a sequential (baseline / extended) JPEG, decoded into the sample planes.
fn decode_scan(scan: &Scan, comps: &mut [Comp], budget: &mut Budget) -> R<usize> {
    let mut coef = [0i32; 64];
    for_each_block(scan, comps, budget, |bits, c, _, bx, by| {
        let (dc, ac) = (scan.dc_table(c)?, scan.ac_table(c)?);
        coef.iter_mut().for_each(|x| *x = 0);
        let t = bits.decode(dc)? as u32;
        if t > 16 {
            return corrupt(format!("DC magnitude category {t} (at most 16)"));
        }
        c.add_dc(bits.receive_extend(t))?;
        // libjpeg stores coefficients as 16-bit JCOEF
        coef[0] = c.dc_pred as i16 as i32;
        let mut k = 1;
        while k < 64 {
            let rs = bits.decode(ac)?;
            let r = (rs >> 4) as usize;
            let s = (rs & 15) as u32;
            if s == 0 {
                if r == 15 {
                    k += 16;
                    continue;
                }
                break;
            }
            k += r;
            if k > 63 {
                return corrupt("an AC run past the end of a block");
            }
            coef[ZIGZAG[k]] = bits.receive_extend(s);
            k += 1;
        }
        let q = c.quant.as_ref().ok_or_else(|| JpegError::Corrupt(format!("component {} has no quantization table", c.id)))?;
        let stride = c.stride;
        let off = by * 8 * stride + bx * 8;
        if off + 7 * stride + 8 <= c.data.len() {
            idct_islow(&coef, q, &mut c.data[off..], stride);
        }
        Ok(())
    })
}

/// Spectral selection and successive approximation of a progressive scan.
struct ProgScan {
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

/// One scan of a progressive JPEG (libjpeg's jdphuff.c), into the coefficient buffers.
fn decode_scan_progressive(scan: &Scan, comps: &mut [Comp], coefs: &mut [Vec<i16>], p: &ProgScan, budget: &mut Budget) -> R<usize> {
    for_each_block(scan, comps, budget, |bits, c, ci, bx, by| {
        let b = by * (c.stride / 8) + bx;
        progressive_block(scan, p, bits, c, &mut coefs[ci][b * 64..b * 64 + 64])
    })
}

/// One block of a progressive scan (`decode_mcu_DC_first` / `_AC_first` / `_DC_refine` /
/// `_AC_refine`), in libjpeg's 16-bit coefficient arithmetic.
fn progressive_block(scan: &Scan, p: &ProgScan, bits: &mut Bits, c: &mut Comp, cf: &mut [i16]) -> R<()> {
    let p1 = (1i32 << p.al) as i16;
    let m1 = (-1i32 << p.al) as i16;
    if p.ss == 0 {
        if p.ah == 0 {
            let t = bits.decode(scan.dc_table(c)?)? as u32;
            if t > 16 {
                return corrupt(format!("DC magnitude category {t} (at most 16)"));
            }
            c.add_dc(bits.receive_extend(t))?;
            cf[0] = (c.dc_pred << p.al) as i16;
        } else if bits.get(1) != 0 {
            cf[0] |= p1;
        }
        return Ok(());
    }
    let ac = scan.ac_table(c)?;
    if p.ah == 0 {
        if bits.eobrun > 0 {
            bits.eobrun -= 1;
            return Ok(());
        }
        let mut k = p.ss;
        while k <= p.se {
            let rs = bits.decode(ac)?;
            let r = (rs >> 4) as u32;
            let s = (rs & 15) as u32;
            if s != 0 {
                k += r as usize;
                if k > 63 {
                    return corrupt("an AC run past the end of a block");
                }
                cf[ZIGZAG[k]] = (bits.receive_extend(s) << p.al) as i16;
            } else if r == 15 {
                k += 15;
            } else {
                bits.eobrun = (1 << r) - 1;
                if r > 0 {
                    bits.eobrun += bits.get(r);
                }
                break;
            }
            k += 1;
        }
        return Ok(());
    }
    // AC refinement
    let refine = |bits: &mut Bits, v: &mut i16| {
        if bits.get(1) != 0 && (*v & p1) == 0 {
            *v = v.wrapping_add(if *v >= 0 { p1 } else { m1 });
        }
    };
    let mut k = p.ss;
    if bits.eobrun == 0 {
        while k <= p.se {
            let rs = bits.decode(ac)?;
            let mut r = (rs >> 4) as i32;
            let s0 = (rs & 15) as u32;
            let mut s = 0i16;
            if s0 != 0 {
                s = if bits.get(1) != 0 { p1 } else { m1 };
            } else if r != 15 {
                bits.eobrun = 1 << r;
                if r > 0 {
                    bits.eobrun += bits.get(r as u32);
                }
                break;
            }
            loop {
                let z = ZIGZAG[k];
                if cf[z] != 0 {
                    refine(bits, &mut cf[z]);
                } else {
                    r -= 1;
                    if r < 0 {
                        break;
                    }
                }
                k += 1;
                if k > p.se {
                    break;
                }
            }
            if s != 0 {
                if k > 63 {
                    return corrupt("an AC refinement past the end of a block");
                }
                cf[ZIGZAG[k]] = s;
            }
            k += 1;
        }
    }
    if bits.eobrun > 0 {
        while k <= p.se {
            let z = ZIGZAG[k];
            if cf[z] != 0 {
                refine(bits, &mut cf[z]);
            }
            k += 1;
        }
        bits.eobrun -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_colour_conversion_equals_jdcolor_tables() {
        let t = ycc_tables();
        let mut ys = Vec::new();
        let mut cbs = Vec::new();
        let mut crs = Vec::new();
        for y in (0..256).step_by(5) {
            for cb in 0..256 {
                for cr in (0..256).step_by(3) {
                    ys.push(y as u8);
                    cbs.push(cb as u8);
                    crs.push(cr as u8);
                }
            }
        }
        let mut out = vec![0u8; ys.len() * 3];
        ycc_to_rgb(&ys, &cbs, &crs, &mut out);
        for i in 0..ys.len() {
            let (y, cb, cr) = (ys[i] as i32, cbs[i] as usize, crs[i] as usize);
            let want = [
                (y + t.cr_r[cr]).clamp(0, 255) as u8,
                (y + ((t.cb_g[cb] + t.cr_g[cr]) >> 16) as i32).clamp(0, 255) as u8,
                (y + t.cb_b[cb]).clamp(0, 255) as u8,
            ];
            assert_eq!(&out[3 * i..3 * i + 3], &want, "y={y} cb={cb} cr={cr}");
        }
    }
}
