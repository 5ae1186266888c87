//! The event files vsft writes, read as TensorBoard reads them: the committed fixture is what
//! TensorBoard's `EventAccumulator` read from a real `vsft train` run's event file
//! (scripts/make_tensorboard_fixture.py, which also checked it against that run's metrics.jsonl).
//! Here the same metrics go through [`Tracker`] again, and the event file it writes is parsed
//! (TFRecord framing with its CRCs, then the `Event` protocol buffers) into the same tags, steps
//! and values.

use std::collections::BTreeMap;
use std::path::Path;

use vsft_track::tensorboard::masked_crc32c;
use vsft_track::{ReportTo, Tracker};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tensorboard")
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*i];
        *i += 1;
        v |= ((byte & 0x7F) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// The protocol-buffer fields of a message: (field number, wire type, payload bytes or value).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

/// tag → [(step, value)] of every scalar event, after the file-version event.
fn read_events(path: &Path) -> (String, BTreeMap<String, Vec<(u64, f32)>>) {
    let b = std::fs::read(path).unwrap();
    let mut i = 0;
    let mut version = String::new();
    let mut scalars: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    while i < b.len() {
        let len_bytes = &b[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap()), masked_crc32c(len_bytes), "length CRC at {i}");
        let data = &b[i + 12..i + 12 + len];
        assert_eq!(u32::from_le_bytes(b[i + 12 + len..i + 16 + len].try_into().unwrap()), masked_crc32c(data), "data CRC at {i}");
        i += 16 + len;
        let event = fields(data);
        let step = event.iter().find(|f| f.0 == 2).map(|f| u64::from_le_bytes(f.2.clone().try_into().unwrap())).unwrap_or(0);
        assert!(event.iter().any(|f| f.0 == 1 && f.1 == 1), "every event has a wall time");
        if let Some(v) = event.iter().find(|f| f.0 == 3) {
            version = String::from_utf8(v.2.clone()).unwrap();
        }
        for summary in event.iter().filter(|f| f.0 == 5) {
            for value in fields(&summary.2).iter().filter(|f| f.0 == 1) {
                let value = fields(&value.2);
                let tag = String::from_utf8(value.iter().find(|f| f.0 == 1).unwrap().2.clone()).unwrap();
                let v = f32::from_le_bytes(value.iter().find(|f| f.0 == 2).unwrap().2.clone().try_into().unwrap());
                scalars.entry(tag).or_default().push((step, v));
            }
        }
    }
    (version, scalars)
}

#[test]
fn event_files_hold_what_tensorboard_read_from_a_real_run() {
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("reader.json")).unwrap()).unwrap();
    let metrics = std::fs::read_to_string(fixtures().join("metrics.jsonl")).unwrap();

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tensorboard");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut tracker = Tracker::open(&dir, &[ReportTo::Jsonl, ReportTo::Tensorboard]).unwrap();
    for line in metrics.lines() {
        tracker.log(&serde_json::from_str(line).unwrap()).unwrap();
    }
    let event_file = tracker.event_file().unwrap().to_path_buf();
    drop(tracker);
    assert!(event_file.starts_with(dir.join("runs")) && event_file.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    // metrics.jsonl gets every record as given (floats through serde_json's parser and printer:
    // equal to 1e-15, not always to the last digit).
    let written = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(written.lines().count(), metrics.lines().count());
    for (a, b) in written.lines().zip(metrics.lines()) {
        let (a, b): (serde_json::Value, serde_json::Value) = (serde_json::from_str(a).unwrap(), serde_json::from_str(b).unwrap());
        assert_eq!(a.as_object().unwrap().keys().collect::<Vec<_>>(), b.as_object().unwrap().keys().collect::<Vec<_>>());
        for (k, x) in a.as_object().unwrap() {
            let (x, y) = (x.as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-15 * y.abs().max(1.0), "{k}: {x} vs {y}");
        }
    }

    let (version, scalars) = read_events(&event_file);
    assert_eq!(version, "brain.Event:2");
    let want = reference["tags"].as_object().unwrap();
    assert_eq!(scalars.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "the tags TensorBoard read");
    let mut n = 0;
    for (tag, points) in &scalars {
        let w = want[tag].as_array().unwrap();
        assert_eq!(points.len(), w.len(), "{tag}: number of points");
        for ((step, v), p) in points.iter().zip(w) {
            assert_eq!(*step, p[0].as_u64().unwrap(), "{tag}: step");
            assert_eq!(*v, p[1].as_f64().unwrap() as f32, "{tag} at step {step}");
            n += 1;
        }
    }
    println!("{} tags, {n} scalars equal to what EventAccumulator read", scalars.len());
}
