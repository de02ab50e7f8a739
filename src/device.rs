//! Where the models run: `--device cpu|cuda[:N]` and `--bf16`, set once per process
//! (as `torch.set_default_device` is) by the `rlhf` binary before any model is
//! loaded, and read by every loader. The default is the CPU, and the default build
//! has no GPU code at all: `cuda` is a cargo feature.
//!
//! On CUDA the model runs on candle's CUDA ops. The fused CPU kernels of `ops` have no
//! GPU twin; `ops::fused_for` sends other devices down the composite candle path,
//! which has a backward. `--bf16` is autocast as PyTorch's: the matrix products run in
//! bf16 on bf16 copies of their operands, everything else (norms, softmax, losses,
//! the optimizer and its f32 master weights) stays in f32. On a CPU it needs AMX-BF16
//! tiles (`ops::amx`): there the dense layers' and the LM head's products run in bf16
//! with f32 results, and attention and candle's own matmuls (the composite paths)
//! stay f32 (`ops::amx` says exactly which).

use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

static DEFAULT: OnceLock<Device> = OnceLock::new();
static AUTOCAST_BF16: AtomicBool = AtomicBool::new(false);

/// What `--device` names, checked before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A GPU by index; `None` (`--device cuda`): the process' local rank in a
    /// data-parallel launch, else GPU 0.
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("expected cpu, cuda or cuda:N (N a GPU's index), got {s:?}");
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(|n| DeviceSpec::Cuda(Some(n)))
                    .map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            DeviceSpec::Cuda(None) => write!(f, "cuda"),
        }
    }
}

impl DeviceSpec {
    /// The candle device; a GPU index that is not there, or a binary built without
    /// the `cuda` feature, is an error that says so.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(
                n.unwrap_or_else(|| crate::distributed::launcher::local_rank().unwrap_or(0)),
            ),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| Error::Invalid(format!("--device cuda:{n}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    Err(Error::Invalid(format!(
        "--device cuda:{n}: this rlhf was built without CUDA; build it with `cargo build --release --features cuda` (README: Scaling out)"
    )))
}

/// Sets the process' device and autocast. Called once, by the binary, before any
/// model is loaded; a second call with another device is refused (one with the same
/// device sets autocast again: `tests/bf16.rs` compares both in one process).
pub fn set_default(spec: DeviceSpec, bf16: bool) -> Result<()> {
    if bf16 && spec == DeviceSpec::Cpu && !crate::ops::amx::available() {
        return Err(Error::Invalid(
            "--bf16 is autocast on a GPU (--device cuda) or on a CPU with AMX-BF16 tiles (Intel Xeon, 4th generation on, under Linux 5.16 or later); this CPU or its OS offers none, and the CPU kernels are f32: run without --bf16".into(),
        ));
    }
    let dev = spec.open()?;
    let set = DEFAULT.get_or_init(|| dev.clone());
    if !set.same_device(&dev) {
        return Err(Error::Invalid(format!(
            "the device is already set to {set:?}"
        )));
    }
    AUTOCAST_BF16.store(bf16, Ordering::Relaxed);
    crate::ops::amx::set_autocast(bf16 && spec == DeviceSpec::Cpu);
    Ok(())
}

/// The device models are loaded on: `--device`, else the CPU.
pub fn default() -> Device {
    DEFAULT.get().cloned().unwrap_or(Device::Cpu)
}

/// Whether matrix products run in bf16 (`--bf16`).
pub fn autocast_bf16() -> bool {
    AUTOCAST_BF16.load(Ordering::Relaxed)
}

/// `a · b` (candle's `matmul`), in bf16 under autocast on a GPU, the result in f32.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if autocast_bf16() && !a.device().is_cpu() && a.dtype() == DType::F32 {
        a.to_dtype(DType::BF16)?
            .matmul(&b.to_dtype(DType::BF16)?)?
            .to_dtype(DType::F32)
    } else {
        a.matmul(b)
    }
}

/// Blocks until the device has finished its queued work (a GPU runs asynchronously):
/// what a wall-clock timer needs before it reads the time.
pub fn synchronize(dev: &Device) -> Result<()> {
    dev.synchronize().map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_refuses_others_by_name() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(None)));
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>(),
            Ok(DeviceSpec::Cuda(Some(3)))
        );
        let err = "gpu".parse::<DeviceSpec>().unwrap_err();
        assert!(
            err.contains("cpu, cuda or cuda:N") && err.contains("\"gpu\""),
            "{err}"
        );
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(Some(1)).to_string(), "cuda:1");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let err = DeviceSpec::Cuda(Some(0)).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn matmul_without_autocast_is_candles() {
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let got = matmul(&a, &a).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, [[7., 10.], [15., 22.]]);
    }
}
