//! The `kiln` command-line tool: devices, the operator library, running operators on
//! safetensors files, emitting kernel source, and the self-test.
//!
//! Longer than most files: clap's command definitions and each command's body, one
//! function per command, in the order `kiln --help` lists them.

use clap::{Parser, Subcommand};
use kiln::codegen::{emit, Target};
use kiln::runtime::{
    list_wgpu_adapters, native_wgpu_backend, resolve, KernelConfig, OpSpec, TensorSpec,
};
use kiln::runtime::{load_safetensors_split, panic_message};
use kiln::selftest::{cases, run_case, Outcome};
use kiln::{save_safetensors, Client, DType, Device, Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "GPU kernels and operators on CUDA and every wgpu backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What kiln can run on here, and which device `auto` picks.
    Devices {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The operator library; with OP, its inputs, outputs and parameters.
    Ops {
        /// An operator name.
        op: Option<String>,
    },
    /// Run an operator on tensors from a safetensors file.
    Run {
        /// Operator name (see `kiln ops`).
        op: String,
        /// safetensors file holding the inputs under their documented names.
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write the outputs to, under their documented names.
        #[arg(long)]
        output: PathBuf,
        /// Device: auto | cuda[:N] | wgpu[:cpu|discrete[:N]|...] (default: $KILN_DEVICE or auto).
        #[arg(long)]
        device: Option<String>,
        /// Operator parameter, key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Print a kernel's generated source (no device needed).
    Emit {
        /// Kernel name (see `kiln emit --list`).
        #[arg(required_unless_present = "list")]
        kernel: Option<String>,
        /// cuda or wgsl.
        #[arg(long, default_value = "wgsl")]
        target: String,
        /// Kernel configuration, key=value (repeatable), e.g. dtype=f16.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Print the manifest (JSON) instead of the source.
        #[arg(long)]
        manifest: bool,
        /// List the kernels and their configuration knobs.
        #[arg(long, conflicts_with_all = ["kernel", "config", "manifest", "target"])]
        list: bool,
    },
    /// Autotune an operator's kernels for a shape on one device and store the winners;
    /// or export/import the stored winners of a device.
    Tune {
        /// Operator name (see `kiln ops`).
        #[arg(required_unless_present_any = ["export", "import"])]
        op: Option<String>,
        /// The problem shape, as `kiln ops OP` describes it: e.g. 2048x2048 for softmax's
        /// x, 1024x1024x1024 (M x N x K) for matmul.
        #[arg(long, required_unless_present_any = ["export", "import"])]
        shape: Option<String>,
        /// Element type of the inputs.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Device (default: $KILN_DEVICE or auto).
        #[arg(long)]
        device: Option<String>,
        /// Write this device's stored winners to FILE (no tuning: takes no OP).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["import", "op"])]
        export: Option<PathBuf>,
        /// Merge winners from FILE (written by --export) into the cache (takes no OP).
        #[arg(long, value_name = "FILE", conflicts_with = "op")]
        import: Option<PathBuf>,
        /// Time every candidate fully instead of the cost model's finalists (re-tunes
        /// keys a ranked search decided).
        #[arg(long)]
        exhaustive: bool,
        /// Operator parameter (repeatable), as for `kiln run`: the tuned kernels are the
        /// ones this call runs (matmul's `trans_b=true` tunes the transposed layout).
        #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with_all = ["export", "import"])]
        set: Vec<String>,
    },
    /// Time an operator at a shape (after tuning): median, throughput, fraction of peak.
    Bench {
        /// Operator name (see `kiln ops`).
        op: String,
        /// The problem shape, as for `kiln tune`.
        #[arg(long)]
        shape: String,
        /// Element type of the inputs.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Device (default: $KILN_DEVICE or auto).
        #[arg(long)]
        device: Option<String>,
        /// Timed runs (the median is reported), 1 to 100000.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        samples: u32,
        /// Operator parameter (repeatable), as for `kiln run`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Compile every kernel x dtype x tuning configuration for CUDA with NVRTC and
    /// ptxas (no GPU needed): registers, spills and shared memory per configuration.
    CheckCuda {
        /// Architectures, comma-separated.
        #[arg(long, default_value = "sm_80,sm_90a", value_delimiter = ',')]
        arch: Vec<String>,
        /// Only these kernels (repeatable; default: every registered kernel).
        #[arg(long)]
        kernel: Vec<String>,
        /// Also vary each `#[comptime]` knob and the vector width, one at a time (a value
        /// that needs another knob changed, with the first such change that gives it
        /// configurations).
        #[arg(long)]
        all_configs: bool,
        /// Also write the table as Markdown to FILE (docs/cuda-registers.md).
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
        /// Compile threads (default: the machine's cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// A compile record (kernels/cuda-compiled.txt): rows whose emitted source it
        /// holds take their report from it, the others compile; then FILE is rewritten
        /// with this run's reports (entries of other kernels and architectures kept
        /// only with --kernel or --arch).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
    },
    /// Print a fresh NCCL unique id (256 hex digits) for `KILN_NCCL_ID`: run it once,
    /// on rank 0's machine, and hand the line to every rank. Needs NCCL, not a GPU.
    NcclId,
    /// Every collective of a communicator against a host reference: `--ranks` ranks in
    /// one process, one thread each; prints one line per case and rank.
    CommCheck {
        /// `host` (staged through host memory, any device) or `nccl` (CUDA devices:
        /// cuda:0..N-1 where there are N, else every rank on cuda:0 if NCCL allows it).
        #[arg(long, default_value = "host")]
        backend: String,
        /// Number of ranks, 1 to 1024 (one thread each; `host`: at most 128, every
        /// transfer of every rank going through the one device's queue).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
        ranks: u32,
        /// Device of every rank for `host` (default: $KILN_DEVICE or auto).
        #[arg(long)]
        device: Option<String>,
        /// Bound on every wait, seconds (at least 1).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
    /// Every operator against its f64 reference, in every float dtype, on one device.
    Selftest {
        /// Device (default: $KILN_DEVICE or auto).
        #[arg(long)]
        device: Option<String>,
        /// Tune kernels on first use as the operators do (default: each kernel's first
        /// configuration, untuned, unless KILN_AUTOTUNE is set; tuning is `kiln tune`'s job).
        #[arg(long)]
        tune: bool,
        /// Only this operator's cases (repeatable; default: every operator's).
        #[arg(long = "op", value_name = "OP")]
        ops: Vec<String>,
    },
}

/// The last panic message of any thread. Panics that kiln catches on purpose (device
/// probing) must not print; one that reaches `main` is reported there, in one line.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(panic_message(info.payload()));
        }
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(p) => {
            let message = panic_message(&*p);
            // The reader of stdout went away (`kiln emit --list | head`): not an error
            // of kiln's; stop quietly, as a program ended by SIGPIPE does.
            if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
                return ExitCode::SUCCESS;
            }
            // Any other failure to write stdout (a full disk, a closed file): the
            // user's environment, not a kiln bug.
            if let Some(why) = message.strip_prefix("failed printing to stdout: ") {
                eprintln!("error: could not write the output to stdout: {why}");
                return ExitCode::from(2);
            }
            eprintln!("error: internal error (please report): {message}");
            ExitCode::from(101)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Devices { json } => devices(json),
        Command::NcclId => comm::nccl_id(),
        Command::CommCheck {
            backend,
            ranks,
            device,
            timeout,
        } => comm::comm_check(&backend, ranks as usize, device, timeout),
        Command::Ops { op } => ops(op.as_deref()),
        Command::Run {
            op,
            input,
            output,
            device,
            set,
        } => run(&op, &input, &output, device, &set),
        Command::Emit {
            kernel,
            target,
            config,
            manifest,
            list,
        } => {
            if list {
                return emit_list();
            }
            let kernel = kernel.unwrap_or_default();
            emit_kernel(&kernel, &target, &config, manifest)
        }
        Command::Tune {
            op,
            shape,
            dtype,
            device,
            export,
            import,
            exhaustive,
            set,
        } => tune::run(
            op.as_deref(),
            shape.as_deref().unwrap_or_default(),
            &dtype,
            device,
            export,
            import,
            exhaustive,
            &key_values(&set, "--set")?,
        ),
        Command::Bench {
            op,
            shape,
            dtype,
            device,
            samples,
            set,
            json,
        } => bench::run(
            &op,
            &shape,
            &dtype,
            device,
            samples as usize,
            &key_values(&set, "--set")?,
            json,
        ),
        Command::Selftest { device, tune, ops } => selftest(device, tune, &ops),
        Command::CheckCuda {
            arch,
            kernel,
            all_configs,
            markdown,
            jobs,
            record,
        } => check_cuda::run(&arch, &kernel, all_configs, markdown, jobs, record),
    }
}

mod bench;
mod check_cuda;
mod comm;
mod progress;
mod tune;

fn device_arg(arg: Option<String>) -> Result<Device> {
    match arg {
        Some(s) => Device::parse(&s),
        None => Device::from_env(),
    }
}

fn key_values(pairs: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .ok_or_else(|| Error::Param {
                param: what.into(),
                expected: "KEY=VALUE".into(),
                found: p.clone(),
            })?;
        if let Some(first) = out.insert(k.clone(), v.clone()) {
            // Silently keeping the last of two values hides a typo in a script.
            return Err(Error::Param {
                param: format!("{what} {k}"),
                expected: "each key once".into(),
                found: format!("{k}={first} and {k}={v}"),
            });
        }
    }
    Ok(out)
}

fn devices(json: bool) -> Result<ExitCode> {
    // `devices` lists what there is; a KILN_DEVICE the other commands would refuse is
    // said here too, since this is where one looks.
    if let Err(e) = Device::from_env() {
        eprintln!("warning: {e}");
    }
    let cuda = kiln::runtime::cuda_device_count();
    let adapters = list_wgpu_adapters();
    let auto = resolve(&Device::Auto);
    let report = auto
        .as_ref()
        .ok()
        .map(|d| Client::open(d).map(|c| c.report().clone()));
    if json {
        let v = serde_json::json!({
            "cuda_devices": cuda,
            "cuda_toolkit": match kiln::runtime::toolkit::find() {
                Ok(tk) => serde_json::to_value(tk).unwrap_or_default(),
                Err(e) => serde_json::json!({"error": e}),
            },
            "nccl": match kiln::runtime::comm::nccl::nccl_version() {
                Ok((v, at)) => serde_json::json!({"version": v.to_string(), "location": at}),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            "wgpu_native_backend": native_wgpu_backend(),
            "wgpu_adapters": adapters,
            "auto": match &report {
                Some(Ok(r)) => serde_json::to_value(r).unwrap_or_default(),
                Some(Err(e)) => serde_json::json!({"error": e.to_string()}),
                None => serde_json::json!({"error": auto.as_ref().err().map(|e| e.to_string())}),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "CUDA devices: {cuda}{}",
            if cuda == 0 {
                " (libcuda/NVRTC absent or no device)"
            } else {
                ""
            }
        );
        match kiln::runtime::toolkit::find() {
            Ok(tk) => println!(
                "CUDA headers: {} (found by {}); NVRTC: {}",
                tk.include_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                tk.found_by,
                tk.nvrtc
                    .as_ref()
                    .map_or("the system library path".into(), |p| p
                        .display()
                        .to_string())
            ),
            Err(e) => println!("CUDA headers: none: {e}"),
        }
        match kiln::runtime::comm::nccl::nccl_version() {
            Ok((v, at)) => println!(
                "NCCL: {v} ({}, found by {})",
                at.path
                    .as_ref()
                    .map_or("libnccl.so.2".into(), |p| p.display().to_string()),
                at.found_by
            ),
            Err(e) => println!("NCCL: none: {e}"),
        }
        match native_wgpu_backend() {
            Some(b) => println!("wgpu adapters (kiln opens those on {b:?}):"),
            None => {
                println!("wgpu adapters: none (this kiln was built without the `wgpu` feature)")
            }
        }
        if adapters.is_empty() {
            println!("  none");
        }
        for a in &adapters {
            println!(
                "  {:<20} {} [{:?}, {:?}, driver {}]{}",
                a.selector,
                a.name,
                a.backend,
                a.adapter_type,
                a.driver,
                if a.usable { "" } else { " (not used by kiln)" }
            );
        }
        println!();
        match report {
            Some(Ok(r)) => println!("auto picks:\n{r}"),
            Some(Err(e)) => println!(
                "auto picks {}, which failed to open: {e}",
                auto.map(|d| d.to_string()).unwrap_or_default()
            ),
            None => println!(
                "auto finds nothing: {}",
                auto.err().map(|e| e.to_string()).unwrap_or_default()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A text column's width: its longest entry (`lens`), at least `min`.
fn column_width(lens: impl Iterator<Item = usize>, min: usize) -> usize {
    lens.max().unwrap_or(0).max(min)
}

/// `specs` under `title`, in columns `w` (name, shape, dtypes) wide.
fn print_tensors(title: &str, specs: &[TensorSpec], w: [usize; 3]) {
    println!("{title}:");
    if specs.is_empty() {
        println!("  none");
    }
    let [wn, ws, wd] = w;
    for t in specs {
        println!(
            "  {:<wn$} {:<ws$} {:<wd$} {}{}",
            t.name,
            t.shape,
            t.dtypes.to_string(),
            t.doc,
            if t.optional { " (optional)" } else { "" }
        );
    }
}

fn ops(op: Option<&str>) -> Result<ExitCode> {
    match op {
        None => {
            let ops = kiln::kernels::ops();
            let w = column_width(ops.iter().map(|o| o.name.len()), 12);
            for o in ops {
                println!("{:<w$} {}", o.name, o.summary);
            }
        }
        Some(name) => {
            let o: &OpSpec = kiln::kernels::op(name)?;
            println!("{}: {}\n", o.name, o.summary);
            // Columns as wide as their longest entry (`d_dispatched`, `d_dispatched's
            // dtype`, `batch_prioritized`), at least as wide as most are.
            let width = |f: fn(&TensorSpec) -> String, min: usize| {
                column_width(o.inputs.iter().chain(o.outputs).map(|t| f(t).len()), min)
            };
            let w = [
                width(|t| t.name.to_string(), 10),
                width(|t| t.shape.to_string(), 34),
                width(|t| t.dtypes.to_string(), 18),
            ];
            print_tensors("inputs", o.inputs, w);
            print_tensors("outputs", o.outputs, w);
            println!("problem shape (kiln tune/bench --shape): {}", o.problem);
            println!("parameters:");
            if o.params.is_empty() {
                println!("  none");
            }
            let w = column_width(o.params.iter().map(|p| p.name.len()), 16);
            for p in o.params {
                println!(
                    "  {:<w$} default {:<8} {} ({})",
                    p.name, p.default, p.doc, p.values
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(
    op: &str,
    input: &PathBuf,
    output: &PathBuf,
    device: Option<String>,
    set: &[String],
) -> Result<ExitCode> {
    let spec = kiln::kernels::op(op)?;
    let params = key_values(set, "--set")?;
    // Validate parameters before touching a device or a file.
    spec.bind(BTreeMap::new(), params.clone())?;
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            return Err(Error::Param {
                param: "--output".into(),
                expected: "a file other than --input (inputs are never overwritten)".into(),
                found: output.display().to_string(),
            });
        }
    }
    // Only the operator's inputs are read: other tensors may have any dtype. Those not
    // used are named (a misspelled optional input would otherwise vanish silently).
    let (hosts, unused) = load_safetensors_split(input, &spec.input_names())?;
    if !unused.is_empty() {
        eprintln!(
            "note: not used by `{op}` (its inputs: {}): {}",
            spec.input_names().join(", "),
            unused.join(", ")
        );
    }
    let client = Client::open(&device_arg(device)?)?;
    progress::announce_tuning(op);
    let (files, unused) = spec.call_host_noting(&client, &hosts, params)?;
    if !unused.is_empty() {
        // Inputs of another kind or parameters of another mode: neither checked nor
        // applied.
        eprintln!(
            "note: given but not used by this call of `{op}` (they do not apply to it): {}",
            unused.join(", ")
        );
    }
    save_safetensors(output, &files)?;
    for (name, h) in &files {
        eprintln!(
            "wrote `{name}` {} {:?} to {}",
            h.dtype,
            h.shape,
            output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn emit_list() -> Result<ExitCode> {
    let kernels = kiln::kernels::kernels();
    let w = column_width(kernels.iter().map(|k| k.name.len()), 12);
    for k in kernels {
        let knobs: Vec<String> = k
            .config
            .iter()
            .map(|p| format!("{}={} ({})", p.name, p.default, p.values))
            .collect();
        println!(
            "{:<w$} {}\n{:<w$} config: {}",
            k.name,
            k.summary,
            "",
            knobs.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn emit_kernel(name: &str, target: &str, config: &[String], manifest: bool) -> Result<ExitCode> {
    let spec = kiln::kernels::kernel(name)?;
    let target = Target::parse(target)?;
    let cfg = KernelConfig::new(spec, key_values(config, "--config")?)?;
    let out = emit(spec, target, &cfg)?;
    if manifest {
        println!(
            "{}",
            serde_json::to_string_pretty(&out.manifest).unwrap_or_default()
        );
    } else {
        println!("{}", out.source);
    }
    Ok(ExitCode::SUCCESS)
}

fn selftest(device: Option<String>, tune: bool, ops: &[String]) -> Result<ExitCode> {
    // Each case keeps its index among all cases: its inputs' seed, so that a case's
    // inputs are the same with or without `--op`.
    let mut cases: Vec<_> = cases().into_iter().enumerate().collect();
    if !ops.is_empty() {
        if let Some(unknown) = ops
            .iter()
            .find(|op| !cases.iter().any(|(_, c)| c.op == op.as_str()))
        {
            let mut known: Vec<&str> = cases.iter().map(|(_, c)| c.op).collect();
            known.dedup();
            return Err(Error::Param {
                param: "--op".into(),
                expected: format!("an operator with self-test cases: {}", known.join(", ")),
                found: unknown.clone(),
            });
        }
        cases.retain(|(_, c)| ops.iter().any(|op| op == c.op));
    }
    let client = Client::open(&device_arg(device)?)?;
    println!("{}\n", client.report());
    // The self-test checks results, not speed: untuned (the first configuration of each
    // kernel, which the tests check like every other) unless asked, or unless
    // KILN_AUTOTUNE says otherwise. Tuning compiles every candidate, which on a fresh
    // lavapipe machine is most of the time (175 s against 45 s).
    let tuner = kiln::runtime::tune::Autotuner::global();
    if tune {
        tuner.set_mode(kiln::runtime::tune::TuneMode::On);
    } else if std::env::var_os("KILN_AUTOTUNE")
        .is_none_or(|v| v.to_string_lossy().trim().is_empty())
    {
        tuner.set_mode(kiln::runtime::tune::TuneMode::Off);
    }
    println!(
        "tuning: {:?} ({})\n",
        tuner.mode(),
        if tune {
            "--tune"
        } else {
            "each kernel's first configuration unless KILN_AUTOTUNE is set; --tune to tune as it goes"
        }
    );
    println!("{:<10} {:<5} {:<52} result", "operator", "dtype", "case");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let start = std::time::Instant::now();
    for (i, case) in &cases {
        for dtype in DType::FLOATS {
            // A panicking case is a failed case, not the end of the self-test: a
            // device's first run should report every case.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_case(&client, case, dtype, 1000 + *i as u64)
            }))
            .unwrap_or_else(|p| Outcome::Error(format!("panicked: {}", panic_message(&*p))));
            let text = match &outcome {
                Outcome::Pass(e, t) => format!("ok    max rel err {e:.2e} (bound {t:.1e})"),
                Outcome::Fail(e, t) => format!("FAIL  max rel err {e:.2e} (bound {t:.1e})"),
                Outcome::Refused(m) => format!("ok    {m}"),
                Outcome::Unavailable(m) => format!("skip  {m}"),
                Outcome::Error(m) | Outcome::Broken(m) => format!("FAIL  {m}"),
            };
            println!(
                "{:<10} {:<5} {:<52} {text}",
                case.op,
                dtype.name(),
                case.what
            );
            match outcome {
                Outcome::Unavailable(_) => skipped += 1,
                o if o.ok() => passed += 1,
                _ => failed += 1,
            }
        }
    }
    let skipped = if skipped > 0 {
        let why = "tensor-core cases: no tensor cores here, or f32, which wmma lacks";
        format!(", {skipped} skipped ({why})")
    } else {
        String::new()
    };
    println!(
        "\nselftest on {}: {passed} passed, {failed} failed{skipped} in {:.1} s",
        client.report().name,
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
