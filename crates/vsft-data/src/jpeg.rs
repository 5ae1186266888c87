//! A baseline JPEG decoder that reproduces libjpeg-turbo's default output (what Pillow
//! gives): `jpeg_idct_islow`, fancy upsampling (h2v1, h2v2, h1v2) with libjpeg's edge and
//! context-row rules, and the table-driven YCbCr->RGB conversion. Progressive and other
//! unusual files return `Unsupported` so the caller can fall back to another decoder.

#[derive(Debug)]
pub enum JpegError {
    /// Valid JPEG features this decoder does not implement (progressive, arithmetic, CMYK...).
    Unsupported(String),
    Corrupt(String),
    /// More pixels than Pillow opens (`Image.MAX_IMAGE_PIXELS` × 2: `DecompressionBombError`).
    TooLarge(String),
}

type R<T> = Result<T, JpegError>;

fn corrupt<T>(m: &str) -> R<T> {
    Err(JpegError::Corrupt(m.to_string()))
}

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
    fn new(counts: &[u8; 16], vals: Vec<u8>) -> R<Self> {
        let mut h = Huffman { vals, ..Default::default() };
        let mut code = 0i32;
        let mut k = 0i32;
        for l in 1..=16 {
            let n = counts[l - 1] as i32;
            h.valptr[l] = k;
            h.mincode[l] = code;
            code += n;
            k += n;
            h.maxcode[l] = if n > 0 { code - 1 } else { -1 };
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        if k as usize > h.vals.len() {
            return corrupt("huffman table too short");
        }
        h.fast = vec![(0, 0); 1 << FAST_BITS];
        let mut code = 0u32;
        let mut p = 0usize;
        for l in 1..=16usize {
            for _ in 0..counts[l - 1] {
                if l <= FAST_BITS {
                    let shift = FAST_BITS - l;
                    for j in 0..(1u32 << shift) {
                        h.fast[((code << shift) | j) as usize] = (l as u8, h.vals[p]);
                    }
                }
                p += 1;
                code += 1;
            }
            code <<= 1;
        }
        Ok(h)
    }
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
    /// Hit a marker: feed zeros from now on (libjpeg does the same).
    marker_hit: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits { data, pos, acc: 0, nbits: 0, marker_hit: false }
    }
    fn fill(&mut self) {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            if !self.marker_hit && self.pos < self.data.len() {
                let b = self.data[self.pos];
                if b == 0xFF {
                    let nb = self.data.get(self.pos + 1).copied().unwrap_or(0xD9);
                    if nb == 0x00 {
                        self.pos += 2;
                        byte = 0xFF;
                    } else {
                        self.marker_hit = true;
                    }
                } else {
                    self.pos += 1;
                    byte = b;
                }
            }
            self.acc |= (byte as u64) << (56 - self.nbits);
            self.nbits += 8;
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
                return corrupt("bad huffman code");
            }
        }
        let idx = (h.valptr[l] + code - h.mincode[l]) as usize;
        h.vals.get(idx).copied().ok_or(JpegError::Corrupt("bad huffman code".into()))
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
    fn restart(&mut self) -> R<()> {
        self.acc = 0;
        self.nbits = 0;
        self.marker_hit = false;
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[self.pos + 1]) {
                self.pos += 2;
                return Ok(());
            }
            if self.data[self.pos] == 0xFF && self.data[self.pos + 1] != 0 && self.data[self.pos + 1] != 0xFF {
                // another marker: leave it (libjpeg would resync); treat as done
                return Ok(());
            }
            self.pos += 1;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Comp {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
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

/// Decodes a baseline JPEG to RGB (grayscale replicated), bit-exact with libjpeg-turbo's
/// defaults. Returns (width, height, rgb).
pub fn decode(data: &[u8]) -> R<(usize, usize, Vec<u8>)> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return corrupt("not a JPEG");
    }
    let mut pos = 2;
    let mut qt = [[0u16; 64]; 4];
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
    // progressive: coefficients per component (natural order, 64 per block, padded grid)
    let mut coefs: Vec<Vec<i32>> = Vec::new();
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
            return corrupt("unexpected end of data");
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
            return corrupt("truncated marker");
        }
        let len = u16::from_be_bytes([data[pos], data[pos + 1]]) as usize;
        if len < 2 || pos + len > data.len() {
            return corrupt("bad marker length");
        }
        let seg = &data[pos + 2..pos + len];
        pos += len;
        match m {
            0xDB => {
                let mut s = seg;
                while !s.is_empty() {
                    let pq = s[0] >> 4;
                    let tq = (s[0] & 15) as usize;
                    if tq > 3 {
                        return corrupt("bad DQT");
                    }
                    let n = if pq == 0 { 64 } else { 128 };
                    if s.len() < 1 + n {
                        return corrupt("short DQT");
                    }
                    for k in 0..64 {
                        let v = if pq == 0 { s[1 + k] as u16 } else { u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]]) };
                        qt[tq][ZIGZAG[k]] = v;
                    }
                    s = &s[1 + n..];
                }
            }
            0xC4 => {
                let mut s = seg;
                while !s.is_empty() {
                    if s.len() < 17 {
                        return corrupt("short DHT");
                    }
                    let tc = s[0] >> 4;
                    let th = (s[0] & 15) as usize;
                    if th > 3 || tc > 1 {
                        return corrupt("bad DHT");
                    }
                    let mut counts = [0u8; 16];
                    counts.copy_from_slice(&s[1..17]);
                    let total: usize = counts.iter().map(|&c| c as usize).sum();
                    if s.len() < 17 + total {
                        return corrupt("short DHT");
                    }
                    let h = Huffman::new(&counts, s[17..17 + total].to_vec())?;
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
                    return corrupt("short DRI");
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
                    return corrupt("two frames");
                }
                frame_seen = true;
                if seg.len() < 6 || seg[0] != 8 {
                    return Err(JpegError::Unsupported("not 8-bit".into()));
                }
                height = u16::from_be_bytes([seg[1], seg[2]]) as usize;
                width = u16::from_be_bytes([seg[3], seg[4]]) as usize;
                let nc = seg[5] as usize;
                if width == 0 || height == 0 {
                    return Err(JpegError::Unsupported("zero size or DNL".into()));
                }
                if width * height > crate::image_proc::MAX_IMAGE_PIXELS {
                    return Err(JpegError::TooLarge(format!(
                        "{width}x{height} = {} pixels exceeds the limit of {} pixels (Pillow's decompression-bomb limit)",
                        width * height,
                        crate::image_proc::MAX_IMAGE_PIXELS
                    )));
                }
                if !(nc == 1 || nc == 3) || seg.len() < 6 + 3 * nc {
                    return Err(JpegError::Unsupported(format!("{nc} components")));
                }
                for k in 0..nc {
                    let c = &seg[6 + 3 * k..9 + 3 * k];
                    let (h, v) = ((c[1] >> 4) as usize, (c[1] & 15) as usize);
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
                        return corrupt("bad component");
                    }
                    comps.push(Comp { id: c[0], h, v, tq: c[2] as usize, stride: 0, rows: 0, data: vec![], dc_pred: 0, td: 0, ta: 0, dw: 0, dh: 0 });
                }
                hmax = comps.iter().map(|c| c.h).max().unwrap();
                vmax = comps.iter().map(|c| c.v).max().unwrap();
                if nc == 1 {
                    // a single component is never subsampled
                    comps[0].h = 1;
                    comps[0].v = 1;
                    hmax = 1;
                    vmax = 1;
                } else {
                    let y = &comps[0];
                    if y.h != hmax || y.v != vmax || comps[1..].iter().any(|c| c.h != 1 || c.v != 1) || hmax > 2 || vmax > 2 {
                        return Err(JpegError::Unsupported(format!("sampling {:?}", comps.iter().map(|c| (c.h, c.v)).collect::<Vec<_>>())));
                    }
                }
                mcux = width.div_ceil(8 * hmax);
                mcuy = height.div_ceil(8 * vmax);
                for c in comps.iter_mut() {
                    c.stride = mcux * c.h * 8;
                    c.rows = mcuy * c.v * 8;
                    c.data = vec![0u8; c.stride * c.rows];
                    if progressive {
                        coefs.push(vec![0i32; (c.stride / 8) * (c.rows / 8) * 64]);
                    }
                    c.dw = (width * c.h).div_ceil(hmax);
                    c.dh = (height * c.v).div_ceil(vmax);
                }
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(JpegError::Unsupported(format!("SOF{}", m - 0xC0)));
            }
            0xDA => {
                if !frame_seen {
                    return corrupt("scan before frame");
                }
                let ns = seg[0] as usize;
                if ns == 0 || seg.len() < 1 + 2 * ns + 3 {
                    return corrupt("bad SOS");
                }
                let mut sc = Vec::new();
                for k in 0..ns {
                    let cid = seg[1 + 2 * k];
                    let t = seg[2 + 2 * k];
                    let ci = comps.iter().position(|c| c.id == cid).ok_or(JpegError::Corrupt("scan component".into()))?;
                    comps[ci].td = (t >> 4) as usize;
                    comps[ci].ta = (t & 15) as usize;
                    if comps[ci].td > 3 || comps[ci].ta > 3 {
                        return corrupt("bad table id");
                    }
                    sc.push(ci);
                }
                for c in comps.iter_mut() {
                    c.dc_pred = 0;
                }
                if progressive {
                    let t = &seg[1 + 2 * ns..];
                    let (ss, se, ah, al) = (t[0] as usize, t[1] as usize, (t[2] >> 4) as u32, (t[2] & 15) as u32);
                    if se > 63 || ss > se || (ss == 0 && se != 0) || (ss > 0 && ns != 1) || al > 13 {
                        return corrupt("bad progressive scan parameters");
                    }
                    let prm = ProgScan { ss, se, ah, al };
                    pos = decode_scan_progressive(data, pos, &sc, &mut comps, &mut coefs, &dc_tables, &ac_tables, restart_interval, mcux, mcuy, &prm)?;
                } else {
                    pos = decode_scan(data, pos, &sc, &mut comps, &qt, &dc_tables, &ac_tables, restart_interval, mcux, mcuy, hmax, vmax)?;
                }
                scans += 1;
            }
            _ => {}
        }
    }
    if !frame_seen || scans == 0 {
        return corrupt("no image data");
    }
    if progressive {
        for (c, cf) in comps.iter_mut().zip(&coefs) {
            let bw = c.stride / 8;
            let q = &qt[c.tq];
            let mut blk = [0i32; 64];
            for (b, block) in cf.chunks_exact(64).enumerate() {
                let (bx, by) = (b % bw, b / bw);
                blk.copy_from_slice(block);
                let off = by * 8 * c.stride + bx * 8;
                let stride = c.stride;
                idct_islow(&blk, q, &mut c.data[off..], stride);
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

#[allow(clippy::too_many_arguments)]
fn decode_scan(
    data: &[u8],
    pos: usize,
    sc: &[usize],
    comps: &mut [Comp],
    qt: &[[u16; 64]; 4],
    dc_tables: &[Option<Huffman>; 4],
    ac_tables: &[Option<Huffman>; 4],
    restart_interval: usize,
    mcux: usize,
    mcuy: usize,
    hmax: usize,
    vmax: usize,
) -> R<usize> {
    let mut bits = Bits::new(data, pos);
    let mut coef = [0i32; 64];
    let single = sc.len() == 1;
    // MCU grid of this scan
    let (nx, ny) = if single {
        let c = &comps[sc[0]];
        // non-interleaved: one block per MCU over the component's own extent
        ((c.dw).div_ceil(8), (c.dh).div_ceil(8))
    } else {
        (mcux, mcuy)
    };
    let _ = (hmax, vmax);
    let total = nx * ny;
    let decode_block = |bits: &mut Bits, c: &mut Comp, bx: usize, by: usize, coef: &mut [i32; 64]| -> R<()> {
        let dc = dc_tables[c.td].as_ref().ok_or(JpegError::Corrupt("missing DC table".into()))?;
        let ac = ac_tables[c.ta].as_ref().ok_or(JpegError::Corrupt("missing AC table".into()))?;
        coef.iter_mut().for_each(|x| *x = 0);
        let t = bits.decode(dc)? as u32;
        if t > 16 {
            return corrupt("bad DC");
        }
        let diff = bits.receive_extend(t);
        c.dc_pred += diff;
        coef[0] = c.dc_pred;
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
                return corrupt("bad AC run");
            }
            coef[ZIGZAG[k]] = bits.receive_extend(s);
            k += 1;
        }
        let q = &qt[c.tq];
        let stride = c.stride;
        let off = by * 8 * stride + bx * 8;
        if off + 7 * stride + 8 <= c.data.len() {
            idct_islow(coef, q, &mut c.data[off..], stride);
        }
        Ok(())
    };
    for m in 0..total {
        if restart_interval > 0 && m > 0 && m % restart_interval == 0 {
            bits.restart()?;
            for &ci in sc {
                comps[ci].dc_pred = 0;
            }
        }
        let (mx, my) = (m % nx, m / nx);
        if single {
            let c = &mut comps[sc[0]];
            decode_block(&mut bits, c, mx, my, &mut coef)?;
        } else {
            for &ci in sc {
                let (h, v) = (comps[ci].h, comps[ci].v);
                for yy in 0..v {
                    for xx in 0..h {
                        let c = &mut comps[ci];
                        decode_block(&mut bits, c, mx * h + xx, my * v + yy, &mut coef)?;
                    }
                }
            }
        }
    }
    // position after the entropy-coded data: next marker that is not RSTn
    let mut p = bits.pos.min(data.len());
    while p + 1 < data.len() {
        if data[p] == 0xFF && data[p + 1] != 0 && !(0xD0..=0xD7).contains(&data[p + 1]) && data[p + 1] != 0xFF {
            break;
        }
        p += 1;
    }
    Ok(p)
}

struct ProgScan {
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

/// One scan of a progressive JPEG (libjpeg's jdphuff.c), into the coefficient buffers.
#[allow(clippy::too_many_arguments)]
fn decode_scan_progressive(
    data: &[u8],
    pos: usize,
    sc: &[usize],
    comps: &mut [Comp],
    coefs: &mut [Vec<i32>],
    dc_tables: &[Option<Huffman>; 4],
    ac_tables: &[Option<Huffman>; 4],
    restart_interval: usize,
    mcux: usize,
    mcuy: usize,
    p: &ProgScan,
) -> R<usize> {
    let mut bits = Bits::new(data, pos);
    let single = sc.len() == 1;
    let (nx, ny) = if single {
        let c = &comps[sc[0]];
        (c.dw.div_ceil(8), c.dh.div_ceil(8))
    } else {
        (mcux, mcuy)
    };
    let mut eobrun: u32 = 0;
    let p1: i32 = 1 << p.al;
    let m1: i32 = -1i32 << p.al;
    let block_op = |bits: &mut Bits, c: &mut Comp, cf: &mut [i32], eobrun: &mut u32| -> R<()> {
        if p.ss == 0 {
            if p.ah == 0 {
                let dc = dc_tables[c.td].as_ref().ok_or(JpegError::Corrupt("missing DC table".into()))?;
                let t = bits.decode(dc)? as u32;
                if t > 16 {
                    return corrupt("bad DC");
                }
                c.dc_pred += bits.receive_extend(t);
                cf[0] = c.dc_pred << p.al;
            } else if bits.get(1) != 0 {
                cf[0] |= p1;
            }
            return Ok(());
        }
        let ac = ac_tables[c.ta].as_ref().ok_or(JpegError::Corrupt("missing AC table".into()))?;
        if p.ah == 0 {
            if *eobrun > 0 {
                *eobrun -= 1;
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
                        return corrupt("bad AC run");
                    }
                    cf[ZIGZAG[k]] = bits.receive_extend(s) << p.al;
                } else if r == 15 {
                    k += 15;
                } else {
                    *eobrun = (1 << r) - 1;
                    if r > 0 {
                        *eobrun += bits.get(r);
                    }
                    break;
                }
                k += 1;
            }
            return Ok(());
        }
        // AC refinement
        let mut k = p.ss;
        if *eobrun == 0 {
            while k <= p.se {
                let rs = bits.decode(ac)?;
                let mut r = (rs >> 4) as i32;
                let s0 = (rs & 15) as u32;
                let mut s = 0i32;
                if s0 != 0 {
                    s = if bits.get(1) != 0 { p1 } else { m1 };
                } else if r != 15 {
                    *eobrun = 1 << r;
                    if r > 0 {
                        *eobrun += bits.get(r as u32);
                    }
                    break;
                }
                loop {
                    let z = ZIGZAG[k];
                    if cf[z] != 0 {
                        if bits.get(1) != 0 && (cf[z] & p1) == 0 {
                            cf[z] += if cf[z] >= 0 { p1 } else { m1 };
                        }
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
                        return corrupt("bad AC refinement");
                    }
                    cf[ZIGZAG[k]] = s;
                }
                k += 1;
            }
        }
        if *eobrun > 0 {
            while k <= p.se {
                let z = ZIGZAG[k];
                if cf[z] != 0 && bits.get(1) != 0 && (cf[z] & p1) == 0 {
                    cf[z] += if cf[z] >= 0 { p1 } else { m1 };
                }
                k += 1;
            }
            *eobrun -= 1;
        }
        Ok(())
    };
    for m in 0..nx * ny {
        if restart_interval > 0 && m > 0 && m % restart_interval == 0 {
            bits.restart()?;
            for &ci in sc {
                comps[ci].dc_pred = 0;
            }
            eobrun = 0;
        }
        let (mx, my) = (m % nx, m / nx);
        if single {
            let ci = sc[0];
            let bw = comps[ci].stride / 8;
            let b = my * bw + mx;
            block_op(&mut bits, &mut comps[ci], &mut coefs[ci][b * 64..b * 64 + 64], &mut eobrun)?;
        } else {
            for &ci in sc {
                let (h, v) = (comps[ci].h, comps[ci].v);
                let bw = comps[ci].stride / 8;
                for yy in 0..v {
                    for xx in 0..h {
                        let b = (my * v + yy) * bw + mx * h + xx;
                        block_op(&mut bits, &mut comps[ci], &mut coefs[ci][b * 64..b * 64 + 64], &mut eobrun)?;
                    }
                }
            }
        }
    }
    let mut q = bits.pos.min(data.len());
    while q + 1 < data.len() {
        if data[q] == 0xFF && data[q + 1] != 0 && !(0xD0..=0xD7).contains(&data[q + 1]) && data[q + 1] != 0xFF {
            break;
        }
        q += 1;
    }
    Ok(q)
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
