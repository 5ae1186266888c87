//! TensorBoard event files, as `torch.utils.tensorboard.SummaryWriter` writes them: a file
//! `events.out.tfevents.<time>.<host>` of TFRecord records, each an `Event` protocol buffer.
//!
//! Only three messages are written (`Event`, `Summary`, `Summary.Value` with `simple_value`),
//! so they are encoded here by hand (a dozen lines of varints) rather than through prost and a
//! generated schema; `scripts/make_tensorboard_fixture.py` reads what this writes with
//! TensorBoard's own `EventAccumulator`, and a test compares.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrackError};

/// Appends scalars to one event file.
pub struct EventWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the file-version event TensorBoard
    /// looks for. `run_start` is the wall time in seconds that names the file.
    pub fn create(dir: &Path, run_start: f64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrackError::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", run_start as u64));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| TrackError::io(&path, e))?;
        let mut w = EventWriter { path, file: std::io::BufWriter::new(file) };
        let mut event = Vec::new();
        put_double(&mut event, 1, run_start);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar at `step` (what `SummaryWriter.add_scalar` writes).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f32, wall_time: f64) -> Result<()> {
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_float(&mut summary_value, 2, value);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &summary_value);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time);
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Makes what was written visible to a reader (TensorBoard polls the file).
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| TrackError::io(&self.path, e))
    }

    /// A TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C.
    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file.write_all(&rec).map_err(|e| TrackError::io(&self.path, e))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, (field as u64) << 3);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_varint(out, ((field as u64) << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_varint(out, ((field as u64) << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    put_varint(out, ((field as u64) << 3) | 2);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// CRC-32C (Castagnoli), bitwise: records are small and written once per log step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TFRecord's mask, so that a CRC of data holding CRCs stays informative.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C ("123456789"), from its specification (RFC 3720).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
