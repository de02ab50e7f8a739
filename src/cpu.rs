//! The machine a number was measured on: the CPU model and the SIMD extensions that
//! decide which kernels run (AVX2, AVX-512, AMX). Benchmarks and the demo's report
//! print it, since a figure from one kind of CPU is no claim about another.

/// The SIMD flags worth naming, in the order printed.
const FLAGS: [&str; 7] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
];

/// "MODEL (N threads; flags: avx2 fma …)" from /proc/cpuinfo, or what can be said
/// without it.
pub fn describe() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    describe_cpuinfo(&info)
}

/// `describe` on the text of a /proc/cpuinfo.
pub fn describe_cpuinfo(info: &str) -> String {
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let present: Vec<&str> = field("flags")
        .map(|f| {
            let have: Vec<&str> = f.split_whitespace().collect();
            FLAGS
                .iter()
                .copied()
                .filter(|x| have.contains(x))
                .collect()
        })
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{model} ({threads} threads; flags: {})",
        if present.is_empty() {
            "none of avx2/avx512f/amx".to_string()
        } else {
            present.join(" ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_model_and_only_the_flags_present() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f\n";
        let d = describe_cpuinfo(info);
        assert!(d.starts_with("AMD EPYC ("), "{d}");
        assert!(d.ends_with("flags: avx2 fma avx512f)"), "{d}");
        let none = describe_cpuinfo("model name : Old\nflags : fpu sse2\n");
        assert!(none.contains("none of"), "{none}");
    }
}
