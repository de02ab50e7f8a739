"""The machine a benchmark ran on, printed with its numbers: the CPU model, its
logical CPU count and the SIMD features that decide which kernels run (rlhf's AVX2
copies, gemm's AVX-512 kernels, PyTorch's bf16 / AMX paths). Read from /proc/cpuinfo
(Linux); elsewhere the fields say "unknown".

    from cpu import describe
    print(describe())   # CPU: AMD EPYC, 2 logical CPUs; SIMD: avx2 avx512f avx512_bf16, no amx
"""
import os

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16")  # and every amx* flag


def cpu_info(path="/proc/cpuinfo"):
    """{"model": str, "logical_cpus": int, "simd": [flag, ...]} for this machine."""
    model, flags = "unknown", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in FLAGS if f in flags] + sorted(f for f in flags if f.startswith("amx"))
    return {"model": model, "logical_cpus": os.cpu_count(), "simd": simd}


def describe(info=None):
    """One line for a benchmark's header."""
    info = info or cpu_info()
    simd = " ".join(info["simd"]) or "none of " + " ".join(FLAGS)
    amx = "" if any(f.startswith("amx") for f in info["simd"]) else ", no amx"
    return f"CPU: {info['model']}, {info['logical_cpus']} logical CPUs; SIMD: {simd}{amx}"


if __name__ == "__main__":
    print(describe())
