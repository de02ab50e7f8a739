//! Training metrics, written as JSON Lines (`metrics.jsonl`) and as TensorBoard event
//! files, with TRL's metric names (`train/loss`, `objective/kl`, ...).
//!
//! The TensorBoard encoding is written here (no maintained crate writes it without
//! pulling in a protobuf toolchain): TFRecord framing — length (u64 LE), masked
//! CRC32-C of the length, the payload, masked CRC32-C of the payload — around
//! hand-encoded `Event` protobufs holding `Summary.Value.simple_value` scalars.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one JSON object per logging step and one TensorBoard event per step.
pub struct MetricsWriter {
    jsonl: File,
    jsonl_path: PathBuf,
    events: File,
    events_path: PathBuf,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl` and a new event file under `dir/runs/`. A run that
    /// resumes from the checkpoint of step `resumed_from` keeps the lines of the steps
    /// up to it and drops the later ones (logged after that checkpoint by the run that
    /// stopped), so that every step appears once; a fresh run starts an empty file.
    /// The event file starts with TensorBoard's session start at the first new step,
    /// which tells TensorBoard to drop the older files' later steps too.
    pub fn create(dir: &Path, resumed_from: Option<u64>) -> Result<Self> {
        let jsonl_path = dir.join(METRICS_FILE);
        let kept = match resumed_from {
            Some(step) if jsonl_path.exists() => {
                lines_up_to(&crate::error::read_to_string(&jsonl_path)?, step)
            }
            _ => String::new(),
        };
        crate::io::write_atomic(&jsonl_path, kept.as_bytes())?;
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .map_err(|e| Error::write(&jsonl_path, e))?;
        let runs = dir.join("runs");
        std::fs::create_dir_all(&runs).map_err(|e| Error::write(&runs, e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut n = 0;
        let events_path = loop {
            let p = runs.join(format!("events.out.tfevents.{now}.rlhf.{n}"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let mut events = File::create(&events_path).map_err(|e| Error::write(&events_path, e))?;
        let header = encode_event(wall_time(), 0, EventBody::FileVersion("brain.Event:2"));
        events
            .write_all(&tfrecord(&header))
            .map_err(|e| Error::write(&events_path, e))?;
        if let Some(step) = resumed_from {
            let start = encode_event(wall_time(), step as i64 + 1, EventBody::SessionStart);
            events
                .write_all(&tfrecord(&start))
                .map_err(|e| Error::write(&events_path, e))?;
        }
        Ok(MetricsWriter {
            jsonl,
            jsonl_path,
            events,
            events_path,
        })
    }

    /// Writes the scalars of one step to both files.
    pub fn log(&mut self, step: u64, scalars: &BTreeMap<String, f64>) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in scalars {
            obj.insert(
                k.clone(),
                if v.is_finite() {
                    Value::from(*v)
                } else {
                    Value::from(v.to_string())
                },
            );
        }
        writeln!(self.jsonl, "{}", Value::Object(obj))
            .map_err(|e| Error::write(&self.jsonl_path, e))?;
        let values: Vec<(&str, f32)> = scalars
            .iter()
            .map(|(k, v)| (k.as_str(), *v as f32))
            .collect();
        let ev = encode_event(wall_time(), step as i64, EventBody::Scalars(&values));
        self.events
            .write_all(&tfrecord(&ev))
            .map_err(|e| Error::write(&self.events_path, e))?;
        self.events
            .flush()
            .map_err(|e| Error::write(&self.events_path, e))
    }

    pub fn events_path(&self) -> &Path {
        &self.events_path
    }
}

/// The lines of a metrics.jsonl whose step is at most `step` (a line cut short by a
/// crash, which does not parse, is dropped too).
fn lines_up_to(text: &str, step: u64) -> String {
    text.lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .flat_map(|l| [l, "\n"])
        .collect()
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// CRC32-C masked as TFRecord does.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, payload, payload's masked CRC.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f32)]),
    /// `SessionLog { status: START }`: TensorBoard drops the steps ≥ this event's
    /// step that earlier files logged (its `purge_orphaned_data`).
    SessionStart,
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// tensorflow.Event { double wall_time = 1; int64 step = 2; string file_version = 3;
/// Summary summary = 5; SessionLog session_log = 7; }, Summary { repeated Value
/// value = 1; }, Value { string tag = 1; float simple_value = 2; }, SessionLog {
/// SessionStatus status = 1; } (START = 1)
fn encode_event(wall_time: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut out = vec![1 << 3 | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(step as u64, &mut out);
    match body {
        EventBody::FileVersion(v) => bytes_field(3, v.as_bytes(), &mut out),
        EventBody::SessionStart => bytes_field(7, &[1 << 3, 1], &mut out),
        EventBody::Scalars(values) => {
            let mut summary = vec![];
            for (tag, x) in values {
                let mut value = vec![];
                bytes_field(1, tag.as_bytes(), &mut value);
                value.push(2 << 3 | 5);
                value.extend_from_slice(&x.to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vector_and_record_layout() {
        // CRC-32C check value (RFC 3720): crc32c("123456789") = 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let rec = tfrecord(b"abc");
        assert_eq!(rec.len(), 8 + 4 + 3 + 4);
        assert_eq!(u64::from_le_bytes(rec[..8].try_into().unwrap()), 3);
        assert_eq!(&rec[12..15], b"abc");
    }

    #[test]
    fn resuming_keeps_the_steps_up_to_the_checkpoint() {
        let text =
            "{\"step\":1,\"a\":1}\n{\"step\":2,\"a\":2}\n{\"step\":3,\"a\":3}\n{\"step\":4,\"a";
        assert_eq!(
            lines_up_to(text, 2),
            "{\"step\":1,\"a\":1}\n{\"step\":2,\"a\":2}\n"
        );
        // The session start: wall_time (field 1), step (field 2), session_log (7)
        // holding status START (field 1 = 1).
        let ev = encode_event(0.0, 5, EventBody::SessionStart);
        assert_eq!(&ev[9..], &[2 << 3, 5, 7 << 3 | 2, 2, 1 << 3, 1]);
    }
}
