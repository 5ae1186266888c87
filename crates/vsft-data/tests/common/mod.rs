//! What the family parity tests share.
#![allow(dead_code)]

use sha2::{Digest, Sha256};

fn hex(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of f32 values as little-endian bytes: how the fixtures record pixel buffers.
pub fn f32_sha256(v: &[f32]) -> String {
    let mut h = Sha256::new();
    v.iter().for_each(|x| h.update(x.to_le_bytes()));
    hex(h)
}

/// SHA-256 (hex) of bytes (8-bit pixel buffers, as Pillow's `tobytes()`).
pub fn sha256(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    hex(h)
}
