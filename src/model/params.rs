//! The parameter table of a model: every tensor's HF name, shape, initialisation and
//! on-disk layout, and the store that holds the tensors as trainable `Var`s.
//!
//! Each family lists its parameters once (`ParamSpec`s); the same list drives random
//! initialisation (`rlhf init`), validation on load (a missing tensor or a wrong shape
//! names the tensor and both shapes), export (GPT-2's Conv1D weights are stored
//! `[in, out]` on disk and transposed once here, on load and on save) and, in training,
//! the parameter groups of AdamW (`decay`).

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};

/// How a parameter starts before training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std), as HF's `_init_weights` does for linears and embeddings.
    Normal(f64),
    Zeros,
    Ones,
    /// Uniform(−bound, bound): PEFT's LoRA A (`kaiming_uniform_(a=√5)`, bound 1/√fan_in).
    Uniform(f64),
}

/// How a parameter is laid out in HF files relative to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfLayout {
    Same,
    /// GPT-2's Conv1D: `[in, out]` on disk, `[out, in]` in memory.
    Transposed,
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// The HF checkpoint name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// The in-memory shape (linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    pub init: Init,
    pub layout: HfLayout,
    /// Whether weight decay applies (not to biases, norms and embeddings).
    pub decay: bool,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
            layout: HfLayout::Same,
            decay: false,
        }
    }
    /// A matrix that gets weight decay.
    pub fn decayed(mut self) -> Self {
        self.decay = true;
        self
    }
    pub fn transposed_on_disk(mut self) -> Self {
        self.layout = HfLayout::Transposed;
        self
    }
    fn disk_shape(&self) -> Vec<usize> {
        match self.layout {
            HfLayout::Same => self.shape.clone(),
            HfLayout::Transposed => self.shape.iter().rev().copied().collect(),
        }
    }
}

/// The tensors of one model, by HF name, each a trainable variable.
#[derive(Debug, Clone)]
pub struct Params {
    pub specs: Vec<ParamSpec>,
    vars: BTreeMap<String, Var>,
    /// Whether `get` hands out detached tensors (a frozen base under LoRA adapters):
    /// the model built from them shares the variables' storage but no backward pass
    /// reaches them.
    frozen: bool,
}

impl Params {
    /// Random initialisation, reproducible from `seed` (ChaCha8, in spec order).
    pub fn init(specs: Vec<ParamSpec>, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for spec in &specs {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = match spec.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => {
                    let dist = Normal::new(0.0f32, std as f32)
                        .map_err(|e| Error::Invalid(format!("init std {std}: {e}")))?;
                    (0..n).map(|_| dist.sample(&mut rng)).collect()
                }
                Init::Uniform(bound) => {
                    let dist = rand_distr::Uniform::new_inclusive(-bound as f32, bound as f32)
                        .map_err(|e| Error::Invalid(format!("init bound {bound}: {e}")))?;
                    (0..n).map(|_| dist.sample(&mut rng)).collect()
                }
            };
            let t = Tensor::from_vec(data, spec.shape.as_slice(), device)?;
            vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Params {
            specs,
            vars,
            frozen: false,
        })
    }

    /// Takes the tensors read from HF files, checks every name and shape against the
    /// specs, converts to f32 and our layout. `path` names the source in errors.
    /// Names may carry a prefix the checkpoint lacks (`transformer.` in hub GPT-2 files).
    pub fn from_hf(
        specs: Vec<ParamSpec>,
        tensors: HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        Self::from_hf_or_init(specs, tensors, path, device, 0, |_| false)
    }

    /// As `from_hf`, but a parameter for which `may_init(name)` holds and that the
    /// files lack is initialised from its spec (seeded): a new head on a pretrained
    /// backbone.
    pub fn from_hf_or_init(
        specs: Vec<ParamSpec>,
        mut tensors: HashMap<String, Tensor>,
        path: &Path,
        device: &Device,
        seed: u64,
        may_init: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut vars = BTreeMap::new();
        let mut fresh = vec![];
        for spec in &specs {
            let Some(t) = take_tensor(&mut tensors, &spec.name) else {
                if may_init(&spec.name) {
                    fresh.push(spec.clone());
                    continue;
                }
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    name: spec.name.clone(),
                });
            };
            let expected = spec.disk_shape();
            if t.dims() != expected.as_slice() {
                return Err(Error::TensorShape {
                    path: path.to_path_buf(),
                    name: spec.name.clone(),
                    expected,
                    got: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            warn_non_finite(&t, &spec.name, path)?;
            let t = match spec.layout {
                HfLayout::Same => t,
                HfLayout::Transposed => t.t()?.contiguous()?,
            };
            vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
        if !fresh.is_empty() {
            vars.extend(Params::init(fresh, seed, device)?.vars);
        }
        Ok(Params {
            specs,
            vars,
            frozen: false,
        })
    }

    /// The tensor of a parameter, tracked for gradients. Panics only on a name that is
    /// not in the spec list, which is a programming error in a model file.
    pub fn get(&self, name: &str) -> Tensor {
        match self.vars.get(name) {
            Some(v) if self.frozen => v.as_tensor().detach(),
            Some(v) => v.as_tensor().clone(),
            None => panic!("parameter {name} is not in the model's spec list"),
        }
    }

    /// The same variables (shared storage, no copy), whose `get` hands out detached
    /// tensors: a model built from them is frozen by type, its weights constants that
    /// no backward pass computes a gradient for (LoRA's base model).
    pub fn frozen(&self) -> Params {
        Params {
            frozen: true,
            ..self.clone()
        }
    }

    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// All variables in spec order (the order optimizers and checkpoints use).
    pub fn vars(&self) -> Vec<(&ParamSpec, &Var)> {
        self.specs
            .iter()
            .map(|s| (s, &self.vars[&s.name]))
            .collect()
    }

    /// One parameter set over several models' parameters, sharing their variables
    /// (an update through it updates the models), each name prefixed `prefix/`: what
    /// one optimizer over PPO's actor and critic sees.
    pub fn union(parts: &[(&str, &Params)]) -> Self {
        let mut specs = vec![];
        let mut vars = BTreeMap::new();
        for (prefix, p) in parts {
            for (spec, var) in p.vars() {
                let mut s = spec.clone();
                s.name = format!("{prefix}/{}", spec.name);
                vars.insert(s.name.clone(), var.clone());
                specs.push(s);
            }
        }
        Params {
            specs,
            vars,
            frozen: false,
        }
    }

    /// A parameter set over existing variables (sharing them), in the given order.
    pub fn from_vars(parts: Vec<(ParamSpec, Var)>) -> Self {
        let mut specs = vec![];
        let mut vars = BTreeMap::new();
        for (spec, var) in parts {
            vars.insert(spec.name.clone(), var);
            specs.push(spec);
        }
        Params {
            specs,
            vars,
            frozen: false,
        }
    }

    /// The same set with one variable replaced (same name and spec).
    pub fn with_var(&self, name: &str, var: Var) -> Params {
        let mut out = self.clone();
        out.vars.insert(name.to_string(), var);
        out
    }

    /// Every parameter's data, flattened, in `vars()` order.
    pub fn flat(&self) -> Result<Vec<Vec<f32>>> {
        self.vars()
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    /// A parameter set with these specs holding `data` (in `vars()` order).
    pub fn from_flat(specs: Vec<ParamSpec>, data: &[Vec<f32>], device: &Device) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (spec, d) in specs.iter().zip(data) {
            let t = Tensor::from_slice(d, spec.shape.as_slice(), device)?;
            vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Params {
            specs,
            vars,
            frozen: false,
        })
    }

    /// The device the variables live on (the CPU for a model with none).
    pub fn device(&self) -> Device {
        self.vars
            .values()
            .next()
            .map_or(Device::Cpu, |v| v.device().clone())
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The tensors in HF names and on-disk layout, ready for safetensors.
    pub fn to_hf(&self) -> Result<Vec<(String, Tensor)>> {
        self.specs
            .iter()
            .map(|spec| {
                let t = self.vars[&spec.name].as_tensor().detach();
                let t = match spec.layout {
                    HfLayout::Same => t,
                    HfLayout::Transposed => t.t()?.contiguous()?,
                };
                Ok((spec.name.clone(), t))
            })
            .collect()
    }
}

/// Notes (on stderr) a tensor that holds NaN or ±inf: a model that loads but whose
/// outputs will be NaN (a diverged run, a broken conversion). A warning, not an
/// error, so that such a folder can still be inspected.
fn warn_non_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    // The sum is finite unless an element is not (f32 weights are far from overflowing
    // in a sum); only then are the elements counted.
    if t.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(());
    }
    let bad = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|x| !x.is_finite())
        .count();
    if bad > 0 {
        crate::note!(
            "warning: {}: tensor {name:?} holds {bad} non-finite values (NaN or inf)",
            path.display()
        );
    }
    Ok(())
}

fn take_tensor(tensors: &mut HashMap<String, Tensor>, name: &str) -> Option<Tensor> {
    if let Some(t) = tensors.remove(name) {
        return Some(t);
    }
    // Hub GPT-2 checkpoints omit the `transformer.` prefix.
    let (_, short) = name.split_once('.')?;
    tensors.remove(short)
}

/// Reads every tensor of one safetensors file, by name.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::bad_file(path, None, format!("not a valid safetensors file: {e}")))
}

/// Writes tensors with `{"format": "pt"}` metadata, which transformers requires.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = crate::io::tmp_path(path);
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| Error::write(&tmp, std::io::Error::other(e.to_string())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::write(path, e))
}
