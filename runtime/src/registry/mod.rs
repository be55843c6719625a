//! The operator and kernel registry types. Operators (kernels crate) fill them in;
//! tools (`kiln ops`, `kiln run`, `kiln emit`, `kiln selftest`) read them.

mod entries;
mod kernel;

pub use entries::{registered_kernels, registered_ops, KernelEntry, OpEntry};
pub use kernel::{Capability, ComptimeParam, KernelConfig, KernelSpec, Tunables};

use crate::{Client, DType, Error, HostTensor, Result, Tensor};
use std::collections::BTreeMap;

/// How `kiln tune`, `kiln bench` and the registry-wide tests draw an input's values
/// (its role decides: a scale must be positive, a log-decay gate at most 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExampleValues {
    /// Standard normal floats; integers as their dtype allows (i32/u32 random bits,
    /// i8 uniform codes in -127..=127, u8 uniform bytes).
    Normal,
    /// Uniform in [0.5, 1.5]: scales and divisors.
    Positive,
    /// `logsigmoid(randn)` clamped at -5: log decays (gates) of gated recurrences.
    LogDecay,
    /// Uniform in [4, 6]: the log-sum-exp of a row of O(1) scores over tens of keys
    /// (an attention backward's `lse`), so that `exp(s - lse)` stays near or below 1.
    LogSumExp,
    /// MoE routes `[S, k]`: choice `i` of every token goes to expert `i` (k distinct
    /// experts per token), so `E = k` experts by default.
    ExpertIds,
    /// MoE slots `[S, k]` matching [`ExampleValues::ExpertIds`]: token `s` in slot `s`
    /// of each of its experts (every slot full, capacity `S`).
    SlotLocations,
    /// A permutation of `0..n` (`[n]`, a seeded shuffle): S²FT's `perm`.
    Permutation,
    /// All zeros: indices valid for any table of at least one entry (adapter ids).
    Zero,
}

/// Which dtypes an operator's tensor may have: a typed rule that `kiln ops` prints, the
/// self-test and the example inputs follow, and operators check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtypes {
    /// A float dtype: f32, f16, or bf16 where the device has it (the one the operator
    /// runs in, unless its doc says otherwise).
    Float,
    /// Exactly this dtype (f32 states and scales, i32 packed codes, i8 codes).
    Fixed(DType),
    /// The dtype of the named tensor (`Like("q")`: q's dtype).
    Like(&'static str),
    /// f32, or the dtype of the named tensor (gates given in f32 or in q's dtype).
    F32OrLike(&'static str),
    /// One of these; example inputs use the first when it is an integer type.
    OneOf(&'static [DType]),
    /// A float dtype chosen by the named parameter (w8a8's `out_dtype`).
    Param(&'static str),
}

impl std::fmt::Display for Dtypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dtypes::Float => f.write_str("f32 | f16 | bf16"),
            Dtypes::Fixed(d) => write!(f, "{d}"),
            Dtypes::Like(t) => write!(f, "{t}'s dtype"),
            Dtypes::F32OrLike(t) => write!(f, "f32 | {t}'s dtype"),
            Dtypes::OneOf(l) => {
                let names: Vec<&str> = l.iter().map(|d| d.name()).collect();
                f.write_str(&names.join(" | "))
            }
            Dtypes::Param(p) => write!(f, "{p} (f32 | f16 | bf16)"),
        }
    }
}

/// A documented operator input or output.
#[derive(Clone, Copy, Debug)]
pub struct TensorSpec {
    /// The name in `kiln run`'s safetensors files.
    pub name: &'static str,
    /// Shape in words, e.g. `[..., D]`.
    pub shape: &'static str,
    /// Allowed dtypes.
    pub dtypes: Dtypes,
    /// Whether the operator runs without it.
    pub optional: bool,
    /// One line on what it holds.
    pub doc: &'static str,
    /// How example inputs are drawn (see [`ExampleValues`]).
    pub example: ExampleValues,
}

impl TensorSpec {
    /// A spec from its fields, for the registries' `static` tables.
    pub const fn new(
        name: &'static str,
        shape: &'static str,
        dtypes: Dtypes,
        optional: bool,
        doc: &'static str,
    ) -> TensorSpec {
        TensorSpec {
            name,
            shape,
            dtypes,
            optional,
            doc,
            example: ExampleValues::Normal,
        }
    }

    /// The same spec with example values drawn as `example` says.
    pub const fn example(self, example: ExampleValues) -> TensorSpec {
        TensorSpec { example, ..self }
    }

    /// The dtype this tensor always has ([`Dtypes::Fixed`]: f32 recurrent states and
    /// scales, i32 packed codes, i8 codes); `None` when it depends on the call.
    pub fn fixed_dtype(&self) -> Option<DType> {
        match self.dtypes {
            Dtypes::Fixed(d) => Some(d),
            _ => None,
        }
    }

    /// The dtype test and benchmark inputs get when the operator runs in `float`: the
    /// fixed dtype, else the first of a list when it is an integer type (`i32 | f32`
    /// zero points default to packed ints), else `float`.
    pub fn example_dtype(&self, float: DType) -> DType {
        match self.dtypes {
            Dtypes::Fixed(d) => d,
            Dtypes::OneOf(&[first, ..]) if !first.is_float() => first,
            _ => float,
        }
    }
}

/// A documented parameter (operator parameter or kernel configuration value).
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    /// Name used with `--set` / `--config`.
    pub name: &'static str,
    /// Default value as text.
    pub default: &'static str,
    /// Allowed values in words.
    pub values: &'static str,
    /// One line on what it does.
    pub doc: &'static str,
}

impl ParamSpec {
    /// A parameter: its name, default, allowed values and what it does.
    pub const fn new(
        name: &'static str,
        default: &'static str,
        values: &'static str,
        doc: &'static str,
    ) -> ParamSpec {
        ParamSpec {
            name,
            default,
            values,
            doc,
        }
    }
}

/// The named outputs of an operator run.
pub type Outputs = Vec<(&'static str, Tensor)>;

/// Named input shapes, what [`OpSpec::example_inputs`] returns for a `--shape`.
pub type InputShapes = Vec<(&'static str, Vec<usize>)>;

/// The `key=value` parameters given with a `--shape` (`--set`; absent keys take their
/// defaults), for the operators whose parameters decide an input's layout (matmul's
/// `trans_b`).
pub type ExampleParams = BTreeMap<String, String>;

/// An operator's in-place form for `kiln bench` ([`OpSpec::in_place`]): set up once from
/// the bound arguments, it returns the work to repeat, each call one in-place step.
pub type InPlace = fn(&Client, &OpArgs) -> Result<Box<dyn FnMut() -> Result<()>>>;

/// A library operator callable by name.
pub struct OpSpec {
    /// Name used by `kiln run` and `kiln ops`.
    pub name: &'static str,
    /// One line on what it computes.
    pub summary: &'static str,
    /// Inputs, by their documented names.
    pub inputs: &'static [TensorSpec],
    /// Outputs, by their documented names.
    pub outputs: &'static [TensorSpec],
    /// Parameters with defaults.
    pub params: &'static [ParamSpec],
    /// Runs the operator on validated arguments.
    pub run: fn(&Client, &OpArgs) -> Result<Outputs>,
    /// What `--shape` means for `kiln tune` / `kiln bench`, e.g. `M x N x K`.
    pub problem: &'static str,
    /// The input shapes for a `--shape` (dims as given) under the given parameters, or
    /// an error naming `--shape`.
    pub example_inputs: fn(&[usize], &ExampleParams) -> Result<InputShapes>,
    /// Work for a `--shape` and element size in bytes: (floating-point operations,
    /// bytes moved to and from device memory at least once), for `kiln bench`.
    pub cost: fn(&[usize], usize) -> (f64, f64),
    /// The operator's self-test cases (small, ragged inputs against its f64 reference),
    /// run by `kiln selftest` and the test suites; at least one is required.
    pub selftest: fn() -> Vec<crate::selftest::Case>,
    /// For an operator whose `run` copies its inputs to stay out of place around work a
    /// user's program does in place (optimizer steps, perturbations): that work as a
    /// training loop repeats it, what `kiln bench` times (the copies would otherwise
    /// dominate). `None`: `kiln bench` times `run`.
    pub in_place: Option<InPlace>,
}

impl OpSpec {
    /// Binds tensors and `key=value` parameters to this operator: unknown parameters
    /// are errors; tensors the operator does not take are ignored (so a file may also
    /// hold expected outputs).
    pub fn bind(
        &'static self,
        tensors: BTreeMap<String, Tensor>,
        params: BTreeMap<String, String>,
    ) -> Result<OpArgs> {
        for k in params.keys() {
            if !self.params.iter().any(|p| p.name == *k) {
                return Err(Error::UnknownParam {
                    op: self.name.into(),
                    param: k.clone(),
                    known: join_names(self.params.iter().map(|p| p.name)),
                });
            }
        }
        Ok(OpArgs {
            spec: self,
            tensors,
            params,
            read: Default::default(),
        })
    }

    /// Binds, runs, and checks that every declared non-optional output was produced.
    pub fn call(
        &'static self,
        client: &Client,
        tensors: BTreeMap<String, Tensor>,
        params: BTreeMap<String, String>,
    ) -> Result<Outputs> {
        self.call_noting(client, tensors, params)
            .map(|(outs, _)| outs)
    }

    /// [`OpSpec::call`], also returning what the call did not use of what it was
    /// given ([`OpArgs::unused`]): `kiln run` names those, since a value the operator
    /// never reads (`head_dim` where only FFN weights are given) is neither checked
    /// nor applied.
    pub fn call_noting(
        &'static self,
        client: &Client,
        tensors: BTreeMap<String, Tensor>,
        params: BTreeMap<String, String>,
    ) -> Result<(Outputs, Vec<String>)> {
        let args = self.bind(tensors, params)?;
        let outs = (self.run)(client, &args)?;
        for o in self.outputs.iter().filter(|o| !o.optional) {
            if !outs.iter().any(|(n, _)| *n == o.name) {
                return Err(Error::Kernel {
                    kernel: self.name.into(),
                    message: format!("declared output `{}` was not produced", o.name),
                });
            }
        }
        Ok((outs, args.unused()))
    }

    /// What `kiln run` does: uploads the host tensors named as this operator's inputs
    /// (others are ignored), runs, and downloads every output by name.
    pub fn call_host(
        &'static self,
        client: &Client,
        hosts: &BTreeMap<String, HostTensor>,
        params: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, HostTensor>> {
        self.call_host_noting(client, hosts, params)
            .map(|(outs, _)| outs)
    }

    /// [`OpSpec::call_host`], also returning the inputs and parameters given that the
    /// call did not use ([`OpArgs::unused`]).
    pub fn call_host_noting(
        &'static self,
        client: &Client,
        hosts: &BTreeMap<String, HostTensor>,
        params: BTreeMap<String, String>,
    ) -> Result<(BTreeMap<String, HostTensor>, Vec<String>)> {
        let (_, outs, unused) = self.upload_and_call(client, hosts, params)?;
        Ok((download_all(outs)?, unused))
    }

    /// [`OpSpec::call_host`] that also holds the operator to its contract on its inputs:
    /// after the call, every input it does not also output (those are updated in place
    /// by contract, as `gla_step`'s `state`) must be on the device bit for bit as it was
    /// uploaded; one that changed is an error naming the operator and the input. The
    /// self-test runs every case through this, so every operator is checked in every
    /// dtype on every device `kiln selftest` runs on.
    pub fn call_host_checked(
        &'static self,
        client: &Client,
        hosts: &BTreeMap<String, HostTensor>,
        params: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, HostTensor>> {
        let (inputs, outs, _) = self.upload_and_call(client, hosts, params)?;
        let outs = download_all(outs)?;
        for (name, t) in &inputs {
            if !self.outputs.iter().any(|o| o.name == name.as_str()) {
                unmodified(self.name, name, &hosts[name], &t.download()?)?;
            }
        }
        Ok(outs)
    }

    /// Uploads the host tensors named as this operator's inputs (others are ignored) and
    /// runs it: the uploaded inputs and the outputs. Parameters are checked first.
    fn upload_and_call(
        &'static self,
        client: &Client,
        hosts: &BTreeMap<String, HostTensor>,
        params: BTreeMap<String, String>,
    ) -> Result<(BTreeMap<String, Tensor>, Outputs, Vec<String>)> {
        // Parameters are checked before anything is uploaded.
        self.bind(BTreeMap::new(), params.clone())?;
        let mut tensors = BTreeMap::new();
        for t in self.inputs {
            if let Some(h) = hosts.get(t.name) {
                tensors.insert(t.name.to_string(), Tensor::upload_named(client, t.name, h)?);
            }
        }
        let (outs, unused) = self.call_noting(client, tensors.clone(), params)?;
        Ok((tensors, outs, unused))
    }

    /// The names of the inputs, in declaration order.
    pub fn input_names(&self) -> Vec<&'static str> {
        self.inputs.iter().map(|t| t.name).collect()
    }
}

/// Every output downloaded, by name.
fn download_all(outs: Outputs) -> Result<BTreeMap<String, HostTensor>> {
    outs.into_iter()
        .map(|(n, t)| Ok((n.to_string(), t.download()?)))
        .collect()
}

/// `Ok` when input `name` of operator `op` is `after` the call what it was `before`, bit
/// for bit (a NaN stays the same NaN); else an error naming the operator, the input and
/// how much of it changed.
pub(crate) fn unmodified(
    op: &str,
    name: &str,
    before: &HostTensor,
    after: &HostTensor,
) -> Result<()> {
    let size = before.dtype.size().max(1);
    let changed: Vec<usize> = before
        .data
        .chunks(size)
        .zip(after.data.chunks(size))
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .map(|(i, _)| i)
        .collect();
    let same_layout = before.dtype == after.dtype && before.shape == after.shape;
    if same_layout && before.data.len() == after.data.len() && changed.is_empty() {
        return Ok(());
    }
    let message = match changed.first() {
        Some(first) if same_layout => format!(
            "modified its input `{name}`, which it does not output: {} of {} elements \
             changed, the first at flat index {first}",
            changed.len(),
            before.data.len() / size,
        ),
        _ => format!(
            "modified its input `{name}`, which it does not output: {} {:?} became {} {:?}",
            before.dtype, before.shape, after.dtype, after.shape
        ),
    };
    Err(Error::Kernel {
        kernel: op.into(),
        message,
    })
}

/// `a, b, c`, or `none`: lists of names in error messages.
pub fn join_names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Arguments bound to an operator: its tensors by name and its parameters as text,
/// with typed, validated accessors whose errors name the tensor or parameter.
pub struct OpArgs {
    spec: &'static OpSpec,
    tensors: BTreeMap<String, Tensor>,
    params: BTreeMap<String, String>,
    /// The names of the inputs and parameters the operator asked for.
    read: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl OpArgs {
    fn input_spec(&self, name: &str) -> Option<&'static TensorSpec> {
        self.spec.inputs.iter().find(|t| t.name == name)
    }

    /// The operator these arguments are bound to.
    pub fn spec(&self) -> &'static OpSpec {
        self.spec
    }

    fn mark(&self, name: &str) {
        if let Ok(mut read) = self.read.lock() {
            read.insert(name.to_string());
        }
    }

    /// The inputs and parameters given (a parameter set, not defaulted) that the
    /// operator never asked for, as `name` for a tensor and `name=value` for a
    /// parameter: what a call with these inputs ignores (a parameter of another
    /// strategy, weights of a kind it does not take together with others).
    pub fn unused(&self) -> Vec<String> {
        let read = self.read.lock().map(|r| r.clone()).unwrap_or_default();
        let tensors = self.tensors.keys().filter(|n| !read.contains(*n)).cloned();
        let params = self
            .params
            .iter()
            .filter(|(n, _)| !read.contains(*n))
            .map(|(n, v)| format!("{n}={v}"));
        tensors.chain(params).collect()
    }

    /// A required input.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.mark(name);
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            op: self.spec.name.into(),
            tensor: name.into(),
            expected: self.input_spec(name).map_or("a tensor".into(), |s| {
                format!("shape {}, dtype {}", s.shape, s.dtypes)
            }),
        })
    }

    /// An optional input.
    pub fn optional_tensor(&self, name: &str) -> Option<&Tensor> {
        self.mark(name);
        self.tensors.get(name)
    }

    fn raw(&self, name: &str) -> Result<&str> {
        self.mark(name);
        if let Some(v) = self.params.get(name) {
            return Ok(v);
        }
        self.spec
            .params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.default)
            .ok_or_else(|| Error::UnknownParam {
                op: self.spec.name.into(),
                param: name.into(),
                known: join_names(self.spec.params.iter().map(|p| p.name)),
            })
    }

    fn bad(&self, name: &str, found: &str) -> Error {
        let expected = self
            .spec
            .params
            .iter()
            .find(|p| p.name == name)
            .map_or("a valid value", |p| p.values);
        Error::Param {
            param: name.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// Whether the caller set parameter `name` (rather than leaving its default).
    pub fn given(&self, name: &str) -> bool {
        self.mark(name);
        self.params.contains_key(name)
    }

    /// A parameter as text (given or default).
    pub fn param(&self, name: &str) -> Result<String> {
        self.raw(name).map(str::to_string)
    }

    /// A parameter parsed as `T`, naming it in the error.
    pub fn param_as<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        let v = self.raw(name)?;
        v.trim().parse::<T>().map_err(|_| self.bad(name, v))
    }

    /// A parameter that must be one of `choices`.
    pub fn param_choice(&self, name: &str, choices: &[&str]) -> Result<String> {
        let v = self.raw(name)?;
        if choices.contains(&v) {
            Ok(v.into())
        } else {
            Err(self.bad(name, v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn a_modified_input_is_named_with_how_much_changed() {
        let before =
            HostTensor::from_f64(DType::F32, vec![2, 3], &[1., 2., 3., 4., 5., f64::NAN]).unwrap();
        assert!(unmodified("op", "x", &before, &before.clone()).is_ok());
        let mut after = before.clone();
        after.data[4] ^= 1; // element 1, one bit
        after.data[12] ^= 1; // element 3
        let e = unmodified("scale", "x", &before, &after)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "kernel `scale`: modified its input `x`, which it does not output: 2 of 6 \
             elements changed, the first at flat index 1"
        );
        // -0.0 and 0.0 compare equal as floats, not as bits: still a modification.
        let zero = HostTensor::from_f64(DType::F32, vec![1], &[0.0]).unwrap();
        let neg = HostTensor::from_f64(DType::F32, vec![1], &[-0.0]).unwrap();
        assert!(unmodified("op", "x", &zero, &neg).is_err());
        let reshaped =
            HostTensor::from_f64(DType::F32, vec![3, 2], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let e = unmodified("op", "w", &before, &reshaped)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32 [2, 3] became f32 [3, 2]"), "{e}");
    }
}
