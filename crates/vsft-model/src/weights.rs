//! Named tensors in and out: building a model from a Hugging Face checkpoint (single file or
//! shards with an index, any of the three LLaVA key layouts, f16/bf16/f32), from a seeded random
//! initialisation, and writing safetensors shards in the Hub's legacy layout.
//!
//! Why not burn-store: it applies whole files onto an already-initialised module (so a model
//! would be held twice while loading), has no sharded-index support, and reports problems per
//! file. Here every tensor is read with one positioned read straight into the tensor that keeps it,
//! so peak memory stays at the model plus one tensor, and all problems are reported at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

use crate::config::{read_json_file, Count};
use crate::error::ModelError;

/// How a parameter is initialised when there is no checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    /// `U(-bound, bound)`.
    Uniform(f64),
    Zeros,
    Ones,
}

/// Supplies the data of each parameter by its canonical name (the Hub's legacy layout).
pub trait TensorProvider {
    /// f32 data of `shape`, or `None` after recording why it could not be supplied.
    fn provide(&mut self, name: &str, shape: &[usize], init: Init) -> Option<Vec<f32>>;
}

/// Creates parameters under a name prefix; modules build themselves through it so that the name
/// given here is the path Burn's visitor reports for saving.
pub struct Builder<'a, B: Backend> {
    provider: &'a mut dyn TensorProvider,
    prefix: String,
    pub device: B::Device,
    /// The dtype of parameters that never train (everything outside the projector).
    frozen_dtype: StoredDtype,
    /// The prefix of the parameters that train in every stage (the family's projector): they
    /// stay f32 whatever `frozen_dtype` says. LLaVA-NeXT's `image_newline` is not among them:
    /// LLaVA-NeXT's own code trains it only when the whole language model trains.
    always_trained: &'static str,
}

impl<'a, B: Backend> Builder<'a, B> {
    pub fn new(provider: &'a mut dyn TensorProvider, device: &B::Device) -> Self {
        Self { provider, prefix: String::new(), device: device.clone(), frozen_dtype: StoredDtype::F32, always_trained: "multi_modal_projector." }
    }

    /// The family's projector prefix (kept in f32 under a bf16 `frozen_dtype`).
    pub fn with_projector(mut self, prefix: &'static str) -> Self {
        self.always_trained = prefix;
        self
    }

    /// Frozen parameters (vision tower, language model) in `dtype`: bf16 halves their memory;
    /// LoRA adapters (added later) and the projector stay f32, as does the optimizer state.
    pub fn with_frozen_dtype(mut self, dtype: StoredDtype) -> Self {
        self.frozen_dtype = dtype;
        self
    }

    pub fn scope(&mut self, name: &str) -> Builder<'_, B> {
        Builder {
            provider: &mut *self.provider,
            prefix: join(&self.prefix, name),
            device: self.device.clone(),
            frozen_dtype: self.frozen_dtype,
            always_trained: self.always_trained,
        }
    }

    pub fn param<const D: usize>(&mut self, shape: [usize; D], name: &str, init: Init) -> Param<Tensor<B, D>> {
        let full = join(&self.prefix, name);
        let dtype = match self.frozen_dtype {
            _ if full.starts_with(self.always_trained) => burn::tensor::DType::F32,
            StoredDtype::F32 => burn::tensor::DType::F32,
            StoredDtype::BF16 => burn::tensor::DType::BF16,
            StoredDtype::F16 => burn::tensor::DType::F16,
        };
        match self.provider.provide(&full, &shape, init) {
            Some(values) => Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), (&self.device, dtype))),
            // The provider has recorded why it has no values, and the load will fail with that:
            // a lazy parameter allocates nothing for a model that is dropped unused (a
            // checkpoint that does not match its config costs no memory for the config's sizes).
            None => Param::uninitialized(ParamId::new(), move |device, _| Tensor::zeros(shape, (device, dtype)), self.device.clone(), true, shape.into()),
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Deterministic random initialisation (same numbers on every backend for a given seed).
pub struct RandomInit {
    state: u64,
}

impl RandomInit {
    pub fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }
    fn next_u64(&mut self) -> u64 {
        // splitmix64: tiny, fast and good enough for weight initialisation.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn fill(&mut self, n: usize, init: Init) -> Vec<f32> {
        match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Uniform(bound) => (0..n).map(|_| ((self.uniform() * 2.0 - 1.0) * bound) as f32).collect(),
            Init::Normal(std) => (0..n)
                .map(|_| {
                    // Box–Muller.
                    let u1 = self.uniform().max(1e-300);
                    let u2 = self.uniform();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                })
                .collect(),
        }
    }
}

impl TensorProvider for RandomInit {
    fn provide(&mut self, _name: &str, shape: &[usize], init: Init) -> Option<Vec<f32>> {
        Some(self.fill(shape.iter().product(), init))
    }
}

/// Element types found in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
}

impl StoredDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Self::F32),
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::BF16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }
    /// The `torch_dtype`/`dtype` spelling used in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
    pub fn from_torch_name(s: &str) -> Option<Self> {
        match s {
            "float32" | "f32" | "fp32" => Some(Self::F32),
            "float16" | "f16" | "fp16" => Some(Self::F16),
            "bfloat16" | "bf16" => Some(Self::BF16),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    key: String,
    dtype: StoredDtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Maps a tensor name from any of the three LLaVA layouts found in the wild to the Hub's legacy
/// layout, which is vsft's canonical naming:
/// - legacy: `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
///   `multi_modal_projector.*`;
/// - transformers 4.52+: `model.language_model.*`, `lm_head.*`, `model.vision_tower.vision_model.*`,
///   `model.multi_modal_projector.*`;
/// - transformers 5: as 4.52+ but `model.vision_tower.*` without `vision_model.`.
pub fn canonical_name(key: &str) -> String {
    let mut k = key.to_string();
    if let Some(rest) = k.strip_prefix("lm_head.") {
        k = format!("language_model.lm_head.{rest}");
    } else if let Some(rest) = k.strip_prefix("model.language_model.") {
        k = format!("language_model.model.{rest}");
    } else if let Some(rest) = k.strip_prefix("model.") {
        k = rest.to_string();
    }
    if let Some(rest) = k.strip_prefix("vision_tower.") {
        if !rest.starts_with("vision_model.") {
            k = format!("vision_tower.vision_model.{rest}");
        }
    }
    k
}

/// A Hugging Face checkpoint opened for reading: headers parsed, tensors read on demand.
pub struct CheckpointReader {
    dir: PathBuf,
    files: Vec<(PathBuf, File)>,
    /// Canonical name → where the tensor lies.
    entries: BTreeMap<String, TensorEntry>,
    consumed: HashSet<String>,
    problems: Vec<String>,
    /// Canonical names that the model does not read (e.g. a tied `lm_head`) and that are fine to skip.
    ignorable: HashSet<String>,
    /// A stored key → its canonical name (the family's key layouts → one naming).
    naming: fn(&str) -> String,
}

impl CheckpointReader {
    /// Opens a checkpoint with the LLaVA families' naming ([`canonical_name`]).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        Self::open_with(dir, canonical_name)
    }

    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`; every
    /// tensor the index places in a shard must be there.
    pub fn open_with(dir: &Path, naming: fn(&str) -> String) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        // Shard file name → the tensors the index places in it.
        let shards: BTreeMap<String, Vec<String>> = if index_path.exists() {
            shard_map(&index_path)?
        } else if single.exists() {
            BTreeMap::from([("model.safetensors".to_string(), Vec::new())])
        } else {
            return Err(ModelError::Input(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut reader = Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            entries: BTreeMap::new(),
            consumed: HashSet::new(),
            problems: Vec::new(),
            ignorable: HashSet::new(),
            naming,
        };
        for (shard, tensors) in shards {
            let path = dir.join(&shard);
            if let Some(first) = tensors.first().filter(|_| !path.is_file()) {
                return Err(ModelError::Safetensors {
                    path: index_path.clone(),
                    message: format!("weight_map places tensor {first} in {shard}, which does not exist"),
                });
            }
            let stored = reader.add_file(&path)?;
            if let Some(missing) = tensors.iter().find(|t| !stored.contains(*t)) {
                return Err(ModelError::Safetensors {
                    path: index_path.clone(),
                    message: format!("weight_map places tensor {missing} in {shard}, which does not hold it"),
                });
            }
        }
        Ok(reader)
    }

    /// Adds one file's tensors; returns the keys it stores.
    fn add_file(&mut self, path: &Path) -> Result<HashSet<String>, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let file_index = self.files.len();
        let mut keys = HashSet::new();
        for h in parse_header(&file, path)? {
            let dtype = StoredDtype::parse(&h.dtype).ok_or_else(|| ModelError::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor {}: unsupported dtype {} (vsft reads F32, F16, BF16)", h.key, h.dtype),
            })?;
            let canonical = (self.naming)(&h.key);
            if let Some(prev) = self.entries.get(&canonical) {
                return Err(ModelError::Safetensors {
                    path: path.to_path_buf(),
                    message: format!("tensors {} and {} are the same model tensor ({canonical}) in two layouts", prev.key, h.key),
                });
            }
            keys.insert(h.key.clone());
            let entry = TensorEntry { file: file_index, key: h.key, dtype, shape: h.shape, start: h.start, end: h.end };
            self.entries.insert(canonical, entry);
        }
        self.files.push((path.to_path_buf(), file));
        Ok(keys)
    }

    pub fn contains(&self, canonical: &str) -> bool {
        self.entries.contains_key(canonical)
    }

    /// Marks a tensor that may be present without the model reading it.
    pub fn ignore(&mut self, canonical: &str) {
        self.ignorable.insert(canonical.to_string());
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    /// The dtype most tensors are stored in.
    pub fn stored_dtype(&self) -> StoredDtype {
        let mut counts: HashMap<&'static str, (usize, StoredDtype)> = HashMap::new();
        for e in self.entries.values() {
            counts.entry(e.dtype.name()).or_insert((0, e.dtype)).0 += 1;
        }
        counts.values().max_by_key(|(n, _)| *n).map(|(_, d)| *d).unwrap_or(StoredDtype::F32)
    }

    /// Reads one tensor (by canonical name) as f32, without checking it against a model.
    pub fn read_f32(&self, canonical: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let e = self
            .entries
            .get(canonical)
            .ok_or_else(|| ModelError::Input(format!("{}: no tensor {canonical}", self.dir.display())))?;
        let (path, file) = &self.files[e.file];
        let n: usize = e.shape.iter().product();
        let values = match e.dtype {
            // f32 is read straight into the buffer the tensor keeps: no second copy.
            StoredDtype::F32 => {
                let mut values = vec![0f32; n];
                // SAFETY: an f32 buffer viewed as bytes (any bit pattern is a valid f32);
                // safetensors stores little-endian, as every platform vsft targets is.
                let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, n * 4) };
                file.read_exact_at(bytes, e.start).map_err(|err| ModelError::io(path, err))?;
                values
            }
            dtype => {
                let mut bytes = vec![0u8; (e.end - e.start) as usize];
                file.read_exact_at(&mut bytes, e.start).map_err(|err| ModelError::io(path, err))?;
                decode_f32(&bytes, dtype)
            }
        };
        Ok((e.shape.clone(), values))
    }

    /// After the model is built: one error listing every missing, unexpected or mis-shaped tensor.
    pub fn finish(self) -> Result<(), ModelError> {
        let mut problems = self.problems;
        let unexpected: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.consumed.contains(*k) && !self.ignorable.contains(*k))
            .collect();
        for k in unexpected {
            problems.push(format!("unexpected tensor {} (not part of the model)", self.entries[k].key));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Mismatch { dir: self.dir, problems: problems.join("\n") })
        }
    }
}

impl TensorProvider for CheckpointReader {
    fn provide(&mut self, name: &str, shape: &[usize], _init: Init) -> Option<Vec<f32>> {
        let Some(e) = self.entries.get(name) else {
            self.problems.push(format!("missing tensor {name} {shape:?}"));
            return None;
        };
        self.consumed.insert(name.to_string());
        if e.shape != shape {
            self.problems.push(format!(
                "tensor {} has shape {:?} in the checkpoint but the config gives {:?}",
                e.key, e.shape, shape
            ));
            return None;
        }
        match self.read_f32(name) {
            Ok((_, v)) => Some(v),
            Err(err) => {
                self.problems.push(err.to_string());
                None
            }
        }
    }
}

/// `model.safetensors.index.json`'s `weight_map` as shard file name → the tensors in it. Shard
/// names must be plain file names in the checkpoint's directory.
fn shard_map(index_path: &Path) -> Result<BTreeMap<String, Vec<String>>, ModelError> {
    let bad = |message: String| ModelError::Safetensors { path: index_path.to_path_buf(), message };
    let index = read_json_file(index_path)?;
    // `metadata` may hold `total_size` alone (transformers 4) or with `total_parameters` (5).
    let map = index.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in map {
        let name = shard.as_str().filter(|s| !s.is_empty() && !s.contains(['/', '\\']) && *s != "." && *s != "..");
        let name = name.ok_or_else(|| bad(format!("weight_map entry {tensor}: {shard} is not a file name in the checkpoint's directory")))?;
        shards.entry(name.to_string()).or_default().push(tensor.clone());
    }
    if shards.is_empty() {
        return Err(bad("weight_map names no tensor".into()));
    }
    Ok(shards)
}

/// The most bytes this process can hold: physical memory plus swap (`/proc/meminfo`), or the
/// address-space limit (`ulimit -v`) when lower, with where the number comes from. Where
/// neither is known, what a Rust allocation can address at all.
pub fn memory_budget() -> (u64, &'static str) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |name: &str| -> Option<u64> {
        meminfo.lines().find_map(|l| l.strip_prefix(name))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?.checked_mul(1024)
    };
    let ram = kib("MemTotal:").map(|m| (m.saturating_add(kib("SwapTotal:").unwrap_or(0)), "physical memory + swap"));
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let address_space = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max address space"))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .map(|b| (b, "the address-space limit, ulimit -v"));
    [ram, address_space].into_iter().flatten().min_by_key(|(b, _)| *b).unwrap_or((isize::MAX as u64, "the address space"))
}

/// Refuses `params` values of `bytes_per_value` bytes each that cannot fit in memory, saying how
/// much they need and how much there is.
pub fn fits_in_memory(params: Count, bytes_per_value: u64) -> Result<(), String> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (Some(n), Some(bytes)) = (params.0, params.0.and_then(|n| n.checked_mul(bytes_per_value))) else {
        return Err("its sizes multiply to more than 2^64 bytes of parameters, which no machine can hold".into());
    };
    let (budget, source) = memory_budget();
    if bytes > budget {
        return Err(format!(
            "{n} parameters need {:.1} GiB at {bytes_per_value} bytes each, more than the {:.1} GiB this machine can hold ({source})",
            gib(bytes),
            gib(budget)
        ));
    }
    Ok(())
}

/// [`fits_in_memory`] for the model a `config.json` describes, its parameters held as `dtype`.
pub fn refuse_unless_fits(config: &Path, params: Count, dtype: StoredDtype) -> Result<(), ModelError> {
    fits_in_memory(params, dtype.size() as u64)
        .map_err(|m| ModelError::TooLarge { path: config.to_path_buf(), message: format!("the model described here does not fit in memory: {m}") })
}

/// One tensor's header entry, with absolute byte offsets.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub key: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

fn dtype_size(dtype: &str) -> Option<u64> {
    match dtype {
        "F64" | "I64" | "U64" => Some(8),
        "F32" | "I32" | "U32" => Some(4),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "I8" | "U8" | "BOOL" => Some(1),
        _ => None,
    }
}

/// The largest header the safetensors format allows (its own reader's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Parses and checks a safetensors header as the format demands: the header lies inside the
/// file, every tensor's bytes match its shape and dtype, and the tensors tile the data region
/// exactly (no overlap, no gap, nothing missing at the end). Sizes use checked arithmetic, so a
/// lying header is refused before anything is allocated for it.
pub fn parse_header(file: &File, path: &Path) -> Result<Vec<HeaderEntry>, ModelError> {
    let bad = |message: String| ModelError::Safetensors { path: path.to_path_buf(), message };
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    if file_len < 8 {
        return Err(bad(format!("truncated: {file_len} bytes, less than the 8-byte header length that starts the format")));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).map_err(|e| ModelError::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {header_len} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")));
    }
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(bad(format!("truncated: the header needs {data_start} bytes, the file has {file_len}")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| ModelError::io(path, e))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let mut out = Vec::new();
    for (key, info) in header {
        if key == "__metadata__" {
            continue;
        }
        let entry = header_entry(&key, &info, data_start).map_err(|m| bad(format!("tensor {key}: {m}")))?;
        out.push(entry);
    }
    out.sort_by_key(|e| (e.start, e.end));
    let mut end = data_start;
    for (i, e) in out.iter().enumerate() {
        if e.start < end {
            let other = &out[i - 1];
            return Err(bad(format!("tensors {} and {} overlap (their data_offsets share bytes)", other.key, e.key)));
        }
        if e.start > end {
            return Err(bad(format!("{} bytes before tensor {} belong to no tensor", e.start - end, e.key)));
        }
        end = e.end;
    }
    if end > file_len {
        return Err(bad(format!("truncated: the header's tensors need a file of {end} bytes, the file has {file_len}")));
    }
    if end < file_len {
        return Err(bad(format!("{} bytes after the last tensor belong to no tensor (file of {file_len} bytes, tensors end at {end})", file_len - end)));
    }
    Ok(out)
}

/// One header entry with absolute offsets; the message does not repeat the tensor's name.
fn header_entry(key: &str, info: &Value, data_start: u64) -> Result<HeaderEntry, String> {
    let dtype = info.get("dtype").and_then(Value::as_str).ok_or("no \"dtype\" string")?.to_string();
    let size = dtype_size(&dtype).ok_or_else(|| format!("unknown dtype {dtype}"))?;
    let as_u64s = |field: &str| -> Result<Vec<u64>, String> {
        let v = info.get(field).ok_or_else(|| format!("no {field:?}"))?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| format!("{field:?} must be a list of non-negative integers, found {v}"))
    };
    let shape = as_u64s("shape")?;
    let offsets = as_u64s("data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(format!("\"data_offsets\" must be [begin, end], found {offsets:?}"));
    };
    if end < begin {
        return Err(format!("data_offsets [{begin}, {end}] end before they begin"));
    }
    let bytes = shape.iter().try_fold(size, |n, &d| n.checked_mul(d));
    if bytes != Some(end - begin) {
        let needs = bytes.map_or("more than 2^64 bytes".to_string(), |b| format!("{b} bytes"));
        return Err(format!("data_offsets [{begin}, {end}] hold {} bytes, shape {shape:?} of {dtype} needs {needs}", end - begin));
    }
    let (Some(start), Some(stop)) = (data_start.checked_add(begin), data_start.checked_add(end)) else {
        return Err(format!("data_offsets [{begin}, {end}] lie beyond any file"));
    };
    let shape = shape.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>().map_err(|_| format!("shape {shape:?} is too large"))?;
    Ok(HeaderEntry { key: key.to_string(), dtype, shape, start, end: stop })
}

/// A tensor read whole from a safetensors file (for small files: adapters, optimizer state, fixtures).
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// An f32 tensor of `shape` holding `values`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        RawTensor { dtype: "F32".into(), shape, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    pub fn to_f32(&self) -> Result<Vec<f32>, ModelError> {
        match self.dtype.as_str() {
            "F64" => Ok(self.bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32).collect()),
            d => StoredDtype::parse(d)
                .map(|dt| decode_f32(&self.bytes, dt))
                .ok_or_else(|| ModelError::Input(format!("tensor of dtype {d} is not a float tensor"))),
        }
    }
    pub fn to_i64(&self) -> Result<Vec<i64>, ModelError> {
        match self.dtype.as_str() {
            "I64" => Ok(self.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect()),
            "I32" => Ok(self.bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64).collect()),
            d => Err(ModelError::Input(format!("tensor of dtype {d} is not an integer tensor"))),
        }
    }
}

/// Reads every tensor of one safetensors file.
pub fn read_tensor_file(path: &Path) -> Result<BTreeMap<String, RawTensor>, ModelError> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut out = BTreeMap::new();
    for h in parse_header(&file, path)? {
        let mut bytes = vec![0u8; (h.end - h.start) as usize];
        file.read_exact_at(&mut bytes, h.start).map_err(|e| ModelError::io(path, e))?;
        out.insert(h.key, RawTensor { dtype: h.dtype, shape: h.shape, bytes });
    }
    Ok(out)
}

pub fn decode_f32(bytes: &[u8], dtype: StoredDtype) -> Vec<f32> {
    match dtype {
        StoredDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StoredDtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        StoredDtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

pub fn encode_f32(values: &[f32], dtype: StoredDtype, out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        StoredDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        StoredDtype::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        StoredDtype::BF16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
}

/// The dotted path of the module a visitor or mapper is in, which is the tensor name of its
/// parameters. The family enum's variant (`Llava`, `LlavaNext`, …) is not part of the name:
/// checkpoints know no such level.
#[derive(Debug, Default, Clone)]
pub struct ModulePath(Vec<(String, String)>);

impl ModulePath {
    pub fn enter(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.0.push((name.to_string(), container_type.to_string()));
        }
    }
    pub fn exit(&mut self, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.0.pop();
        }
    }
    pub fn join(&self) -> String {
        self.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(".")
    }
    /// The type of the module that holds the current parameter (`Struct:LayerNorm`, …).
    pub fn holder(&self) -> Option<&str> {
        self.0.last().map(|(_, t)| t.as_str())
    }
}

/// Collects every float parameter of a module with its path (= its tensor name).
pub struct NamedParams<B: Backend> {
    path: ModulePath,
    pub tensors: Vec<(String, ParamId, TensorRef<B>)>,
}

/// A parameter tensor of any rank, flattened for saving.
#[derive(Clone, Debug)]
pub struct TensorRef<B: Backend> {
    pub shape: Vec<usize>,
    pub flat: Tensor<B, 1>,
}

impl<B: Backend> NamedParams<B> {
    pub fn collect<M: Module<B>>(module: &M) -> Vec<(String, ParamId, TensorRef<B>)> {
        let mut v = Self { path: ModulePath::default(), tensors: Vec::new() };
        module.visit(&mut v);
        v.tensors
    }
}

impl<B: Backend> ModuleVisitor<B> for NamedParams<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        self.tensors.push((self.path.join(), param.id, TensorRef { shape, flat: t.reshape([n]) }));
    }
}

/// One tensor to write: its name, shape and a way to get its f32 values when its turn comes
/// (so that a shard never needs all its tensors in host memory at once).
pub struct PendingTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Box<dyn FnOnce() -> Vec<f32> + 'a>,
}

impl<'a> PendingTensor<'a> {
    pub fn from_tensor<B: Backend>(name: String, t: &'a TensorRef<B>) -> Self {
        Self {
            name,
            shape: t.shape.clone(),
            values: Box::new(move || t.flat.to_data().convert::<f32>().into_vec::<f32>().expect("f32 data")),
        }
    }
}

/// Writes one safetensors file (header `{"format":"pt"}` metadata) to `path`, streaming each tensor.
pub fn write_safetensors(path: &Path, tensors: Vec<PendingTensor<'_>>, dtype: StoredDtype) -> Result<(), ModelError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in &tensors {
        let n = t.shape.iter().product::<usize>() * dtype.size();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header)).expect("json");
    // The format pads the header with spaces so that data starts 8-byte aligned.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let file = File::create(path).map_err(|e| ModelError::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| ModelError::io(path, e);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    let mut buf = Vec::new();
    for t in tensors {
        buf.clear();
        encode_f32(&(t.values)(), dtype, &mut buf);
        w.write_all(&buf).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| ModelError::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Writes tensors as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards of at
/// most `max_shard_bytes` each plus `model.safetensors.index.json`, as `save_pretrained` does.
pub fn write_sharded(
    dir: &Path,
    tensors: Vec<PendingTensor<'_>>,
    dtype: StoredDtype,
    max_shard_bytes: u64,
) -> Result<(), ModelError> {
    let total_bytes: u64 = tensors.iter().map(|t| (t.shape.iter().product::<usize>() * dtype.size()) as u64).sum();
    let total_params: u64 = tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let mut shards: Vec<Vec<PendingTensor<'_>>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let n = (t.shape.iter().product::<usize>() * dtype.size()) as u64;
        if current > 0 && current + n > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += n;
        shards.last_mut().expect("one shard").push(t);
    }
    if shards.len() == 1 {
        return write_safetensors(&dir.join("model.safetensors"), shards.pop().expect("one"), dtype);
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        for t in &shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
        write_safetensors(&dir.join(&name), shard, dtype)?;
    }
    let index = serde_json::json!({
        "metadata": {"total_parameters": total_params, "total_size": total_bytes},
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json")).map_err(|e| ModelError::io(&path, e))
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or a byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((num * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_layouts_map_to_the_legacy_names() {
        for (k, want) in [
            ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
            ("model.language_model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
            ("lm_head.weight", "language_model.lm_head.weight"),
            ("language_model.lm_head.weight", "language_model.lm_head.weight"),
            ("model.vision_tower.vision_model.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
            ("model.vision_tower.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
            ("vision_tower.embeddings.class_embedding", "vision_tower.vision_model.embeddings.class_embedding"),
            ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
        ] {
            assert_eq!(canonical_name(k), want, "{k}");
        }
    }

    #[test]
    fn sizes_parse_like_save_pretrained() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2MiB"), Some(2 * 1024 * 1024));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("3 parsecs"), None);
    }
}
