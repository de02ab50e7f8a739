//! What the bench examples share: the machine they ran on (printed with every
//! result, as bench/cpu.py does for the Python side), the median and peak RSS.
#![allow(dead_code)]

use serde_json::{json, Value};

/// The SIMD features that decide which kernels run, and every `amx*` flag.
const FLAGS: [&str; 4] = ["avx2", "fma", "avx512f", "avx512_bf16"];

/// {"model", "logical_cpus", "simd": [...]} from /proc/cpuinfo ("unknown" elsewhere).
pub fn cpu_info() -> Value {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let flags: Vec<String> = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut simd: Vec<&str> = FLAGS
        .into_iter()
        .filter(|f| flags.iter().any(|g| g == f))
        .collect();
    let mut amx: Vec<&str> = flags
        .iter()
        .filter(|f| f.starts_with("amx"))
        .map(String::as_str)
        .collect();
    amx.sort();
    simd.extend(amx);
    json!({
        "model": field("model name").unwrap_or_else(|| "unknown".into()),
        "logical_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "simd": simd,
    })
}

/// The median (the mean of the two middle values for an even count), as Python's
/// `statistics.median` computes it on the other side.
pub fn median(times: &[f64]) -> f64 {
    assert!(!times.is_empty(), "no timed runs");
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    }
}

/// The process's peak resident memory (VmHWM) in MB; 0 where /proc is absent.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
