//! The process's peak resident memory, per stage: Linux keeps the high-water mark in
//! `/proc/self/status` (`VmHWM`) and resets it when `5` is written to
//! `/proc/self/clear_refs`. Elsewhere both are unavailable and report nothing.

/// Resets the high-water mark to the current resident size (Linux ≥ 4.0).
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident memory since the last reset (or the start), MiB.
pub fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_covers_an_allocation_and_resets() {
        if super::peak_mib().is_none() {
            println!("skipped: no /proc/self/status VmHWM on this system");
            return;
        }
        assert!(super::reset_peak());
        let before = super::peak_mib().unwrap();
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let during = super::peak_mib().unwrap();
        assert!(during >= before + 60.0, "{before} → {during}");
        drop(big);
        assert!(super::reset_peak());
        assert!(super::peak_mib().unwrap() < during - 30.0);
    }
}
