//! The machine a number was measured on: the CPU model and the SIMD extensions that
//! decide which kernels run (AVX2, AVX-512, AMX). Benchmarks and the demo's report
//! print it, since a figure from one kind of CPU is no claim about another.

use serde::Serialize;

/// The SIMD flags worth naming (every `amx*` flag is added after them).
const FLAGS: [&str; 4] = ["avx2", "fma", "avx512f", "avx512_bf16"];

/// A CPU as /proc/cpuinfo describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cpu {
    pub model: String,
    pub logical_cpus: usize,
    /// The flags of `FLAGS` present, then every `amx*` flag, sorted.
    pub simd: Vec<String>,
}

impl Cpu {
    /// This machine's CPU ("unknown" model where /proc/cpuinfo is missing).
    pub fn read() -> Self {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
        Self::parse(&info, threads)
    }

    /// A CPU from the text of a /proc/cpuinfo.
    pub fn parse(info: &str, logical_cpus: usize) -> Self {
        let field = |key: &str| {
            info.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let have: Vec<&str> = flags.split_whitespace().collect();
        let mut simd: Vec<String> = FLAGS
            .iter()
            .filter(|f| have.contains(f))
            .map(|f| f.to_string())
            .collect();
        let mut amx: Vec<String> = have
            .iter()
            .filter(|f| f.starts_with("amx"))
            .map(|f| f.to_string())
            .collect();
        amx.sort();
        simd.extend(amx);
        Cpu {
            model: field("model name").unwrap_or_else(|| "unknown".into()),
            logical_cpus,
            simd,
        }
    }

    /// "MODEL (N logical CPUs; SIMD: avx2 fma …)".
    pub fn describe(&self) -> String {
        let simd = if self.simd.is_empty() {
            "none of avx2/avx512f/amx".to_string()
        } else {
            self.simd.join(" ")
        };
        format!(
            "{} ({} logical CPUs; SIMD: {simd})",
            self.model, self.logical_cpus
        )
    }
}

/// This machine's CPU in one line.
pub fn describe() -> String {
    Cpu::read().describe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_model_and_only_the_flags_present() {
        let info =
            "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 amx_tile fma avx512f\n";
        let cpu = Cpu::parse(info, 2);
        assert_eq!(cpu.model, "AMD EPYC");
        assert_eq!(cpu.simd, ["avx2", "fma", "avx512f", "amx_tile"]);
        assert_eq!(
            cpu.describe(),
            "AMD EPYC (2 logical CPUs; SIMD: avx2 fma avx512f amx_tile)"
        );
        let none = Cpu::parse("model name : Old\nflags : fpu sse2\n", 1);
        assert!(none.describe().contains("none of"), "{none:?}");
        assert_eq!(Cpu::parse("", 1).model, "unknown");
    }
}
