//! What the bench examples share: the machine they ran on (printed with every
//! result, as bench/cpu.py does for the Python side), the median and peak RSS.
#![allow(dead_code)]

use serde_json::Value;

/// {"model", "logical_cpus", "simd": [...]} of this machine (`rlhf::cpu`).
pub fn cpu_info() -> Value {
    serde_json::to_value(rlhf::cpu::Cpu::read()).unwrap_or(Value::Null)
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

/// CPU time of the whole process (all threads), in seconds: steadier than wall time
/// when other work shares the cores.
pub fn cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, t: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime failed");
    t.sec as f64 + t.nsec as f64 * 1e-9
}
