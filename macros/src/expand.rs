//! Code generation for `#[kiln::kernel]`.
//!
//! Longer than most files on purpose: `expand` generates one kernel's items in one
//! pass, and its sections (names in scope, launch arguments, space and key, emission,
//! the output) read in the order of what they generate. The helpers it uses (crate
//! paths, identifier checks) are in `names.rs`.

use crate::args::{Bucket, KernelArgs};
use crate::names::{
    camel, check_idents, dsl_path, fnv1a, mentions, respan_to_call_site, runtime_path, Capabilities,
};
use crate::signature::{analyse, Arg, Elem, Signature};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::visit::Visit;
use syn::{Expr, Ident, ItemFn};

pub fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    // The checks run on the tokens as written, so a diagnostic points at the user's
    // token with nothing added; the code is generated from the re-spanned tokens.
    generate(attr.clone(), item.clone())?;
    // One set of bindings however the kernel's tokens were written (`respan_to_call_site`).
    generate(respan_to_call_site(attr), respan_to_call_site(item))
}

/// Checks a kernel's attribute and function and generates its items.
fn generate(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    // The attribute is hashed with the function: a changed tune list or requirement
    // invalidates the cached decisions as a changed body does.
    let attr_text = attr.to_string();
    let args: KernelArgs = syn::parse2(attr)?;
    let mut func: ItemFn = syn::parse2(item.clone())?;
    let sig: Signature = analyse(&func)?;
    let rt = runtime_path();
    let dsl = dsl_path();
    let kname = &sig.name;
    let reg_name = args
        .name
        .as_ref()
        .map(|l| l.value())
        .unwrap_or_else(|| kname.to_string());

    // ---- names in scope for the host-side expressions
    // Tunables are UPPER_CASE by convention (as in Triton): generated bindings carry the
    // macro's span, so rustc's naming lints do not fire on code the user did not write.
    let tunables_owned: Vec<Ident> = args
        .tunables
        .iter()
        .map(|t| Ident::new(&t.name.to_string(), Span::call_site()))
        .collect();
    let tunables: Vec<&Ident> = tunables_owned.iter().collect();
    let scalars: Vec<(&Ident, &Ident)> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Scalar { name, ty } | Arg::Comptime { name, ty } => Some((name, ty)),
            _ => None,
        })
        .collect();
    let comptimes: Vec<(&Ident, &Ident)> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Comptime { name, ty } => Some((name, ty)),
            _ => None,
        })
        .collect();
    // Every `#[comptime] u32` has a declared domain, checked before expansion: a kernel
    // specialised on `kp = 0` divides by zero, on `kp = 100000` unrolls without end.
    for (n, ty) in &comptimes {
        if *ty == "u32" && !args.domains.iter().any(|(d, _)| d == *n) {
            return Err(syn::Error::new(
                n.span(),
                format!("`#[comptime] {n}: u32` needs its values: `domain({n} = [16, 32, 64])` or `domain({n} = 1..=256)` (the kernel is specialised on each)"),
            ));
        }
    }
    for (d, _) in &args.domains {
        if !comptimes.iter().any(|(n, ty)| *n == d && *ty == "u32") {
            return Err(syn::Error::new(
                d.span(),
                format!("`{d}` in `domain` is not a `#[comptime] u32` argument of `{kname}`"),
            ));
        }
    }
    let domain_checks: Vec<TokenStream> = args
        .domains
        .iter()
        .map(|(n, d)| {
            let s = n.to_string();
            let text = d.text();
            let holds = match d {
                crate::args::Domain::List(v) => quote!([#(#v),*].contains(&#n)),
                crate::args::Domain::Range(a, b) => quote!((#a..=#b).contains(&#n)),
            };
            quote! {
                if !#holds {
                    return Err(#rt::Error::Param { param: #s.into(), expected: #text.into(), found: #n.to_string() });
                }
            }
        })
        .collect();
    let mut allowed: Vec<String> = tunables.iter().map(|t| t.to_string()).collect();
    allowed.extend(scalars.iter().map(|(n, _)| n.to_string()));
    allowed.push("device".into());
    let shape_names = format!("a tunable, a scalar argument of `{kname}`, or `device`");
    check_idents(&args.require, &allowed, "require", &shape_names)?;
    let grid = args.grid.clone().unwrap_or_default();
    // The kernel's vector width (`N: Size`), chosen at launch, may size the grid.
    match (&sig.vector, &args.vector) {
        (Some(n), None) => {
            return Err(syn::Error::new(
                n.span(),
                format!("`{kname}` has a vector-width generic `{n}`: declare its widths, e.g. `vector = [4, 2, 1]`"),
            ))
        }
        (None, Some((span, _))) => {
            return Err(syn::Error::new(
                *span,
                format!("`vector` needs a vector-width generic on `{kname}` (`N: Size`, arrays `&Array<Vector<F, N>>`)"),
            ))
        }
        _ => {}
    }
    let mut grid_allowed = allowed.clone();
    if sig.vector.is_some() {
        grid_allowed.push("VECTOR".into());
    }
    let grid_names = if sig.vector.is_some() {
        format!("a tunable, a scalar argument of `{kname}`, `VECTOR` or `device`")
    } else {
        shape_names.clone()
    };
    check_idents(&grid, &grid_allowed, "grid", &grid_names)?;
    let cube = args.cube.clone().unwrap_or_default();
    let tun_names: Vec<String> = tunables.iter().map(|t| t.to_string()).collect();
    let mut cube_names = tun_names.clone();
    cube_names.extend(comptimes.iter().map(|(n, _)| n.to_string()));
    check_idents(
        &cube,
        &cube_names,
        "cube",
        "a tunable or a #[comptime] argument: the cube size must not depend on the problem shape",
    )?;
    for k in &args.key {
        if k.name == "dtype" {
            if sig.generic.is_none() {
                return Err(syn::Error::new(
                    k.name.span(),
                    format!("key `dtype`: `{kname}` has no float generic"),
                ));
            }
            continue;
        }
        if !scalars.iter().any(|(n, _)| **n == k.name) {
            let known: Vec<String> = scalars.iter().map(|(n, _)| n.to_string()).collect();
            return Err(syn::Error::new(
                k.name.span(),
                format!(
                    "key `{}` names no scalar argument of `{kname}` (scalars: {})",
                    k.name,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }

    // ---- the cubecl kernel: tunables become trailing comptime u32 parameters
    for t in &tunables {
        let p: syn::FnArg = syn::parse_quote!(#[comptime] #t: u32);
        func.sig.inputs.push(p);
    }
    // On a CPU adapter, scalar arguments are copied into locals before the body's first
    // branch (a trailing `#[comptime] local_scalars`, set at launch from the device).
    // cubecl reads a scalar argument from its `info` storage buffer at every use, and
    // lavapipe (Mesa's llvmpipe) turns a storage read inside control flow into one load per
    // lane, while a read before any branch is one load: measured, an AdamW step that read
    // its eight scalars in its loop ran at 0.69 of a 4-wide copy, 0.90 with the copies. On
    // a GPU the copies would only hold registers (NVRTC spilled 4-16 bytes in 23 of 1164
    // CUDA configurations with them), so GPUs get the body as written. The body may read
    // the flag too: kernels with a register tile store it with a loop over its rows on a
    // CPU adapter (`shift_rows` in kiln-kernels' matmul module).
    let has_scalars = sig.args.iter().any(|a| matches!(a, Arg::Scalar { .. }));
    let local_flag = format_ident!("local_scalars");
    if has_scalars {
        let copies: Vec<syn::Stmt> = sig
            .args
            .iter()
            .filter_map(|a| match a {
                // `mut`: cubecl gives a mutable binding its own local variable (an
                // immutable one would alias the argument, read at each use again).
                Arg::Scalar { name, .. } => Some(syn::parse_quote! {
                    let #name = if comptime!(#local_flag) {
                        let mut __local = #name;
                        __local
                    } else {
                        #name
                    };
                }),
                _ => None,
            })
            .collect();
        func.block.stmts.splice(0..0, copies);
        func.sig
            .inputs
            .push(syn::parse_quote!(#[comptime] #local_flag: bool));
    }
    func.attrs
        // Scalars may serve only the host-side grid, key or constraints.
        .push(syn::parse_quote!(#[allow(non_snake_case, unused_variables, unused_mut, clippy::too_many_arguments)]));
    let vis = func.vis.clone();

    // ---- generated names
    let camel_name = camel(&kname.to_string());
    let host = format_ident!("{}", camel_name);
    let config = format_ident!("{}Config", camel_name);
    let spec_static = format_ident!("{}_KERNEL", kname.to_string().to_uppercase());
    let source_hash = fnv1a(&format!("{attr_text} {item}"));
    let summary = func
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .find_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .unwrap_or_else(|| format!("kernel `{reg_name}`"));

    // ---- launch arguments: tensors for arrays, values for scalars
    let host_params: Vec<TokenStream> = sig
        .args
        .iter()
        .map(|a| match a {
            Arg::Input { name, .. } => quote!(#[doc = "An input tensor."] pub #name: &'a #rt::Tensor),
            Arg::Output { name, .. } => quote!(#[doc = "An output tensor (overwritten)."] pub #name: &'a #rt::Tensor),
            Arg::Scalar { name, ty } => quote!(#[doc = "A scalar argument."] pub #name: #ty),
            Arg::Comptime { name, ty } => quote!(#[doc = "A `#[comptime]` argument (one compiled variant per value)."] pub #name: #ty),
        })
        .collect();
    let host_names: Vec<&Ident> = sig.args.iter().map(Arg::name).collect();
    let first_generic = sig.args.iter().find_map(|a| match a {
        Arg::Input {
            name,
            elem: Elem::Generic,
            ..
        }
        | Arg::Output {
            name,
            elem: Elem::Generic,
            ..
        } => Some(name),
        _ => None,
    });
    let dtype_expr = match first_generic {
        Some(n) => quote!(#n.dtype()),
        None => quote!(#rt::DType::F32),
    };
    let tensor_checks: Vec<TokenStream> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Input { name, elem, width } | Arg::Output { name, elem, width } => {
                let n = name.to_string();
                let width_check = (*width > 1 && *width != 0).then(|| quote! {
                    if #name.numel() % (#width as usize) != 0 {
                        return Err(#rt::Error::Shape {
                            tensor: #n.into(),
                            expected: format!("whose element count is divisible by {} (read as {}-wide vectors)", #width, #width),
                            found: #rt::shape_str(#name.shape()),
                        });
                    }
                });
                let dt = match elem {
                    Elem::Generic => quote!(__dtype),
                    Elem::Concrete(ty) | Elem::Atomic(ty) => {
                        let s = ty.to_string();
                        quote!(#rt::DType::parse(#s)?)
                    }
                };
                Some(quote! {
                    #width_check
                    #name.expect_usable(#n, client)?;
                    #name.expect_dtype(#n, &[#dt])?;
                    client.require_dtype(#n, #name.dtype())?;
                })
            }
            _ => None,
        })
        .collect();
    // A written array may not overlap another array of the launch in part (views of one
    // buffer): the kernel would read what other units write, in no defined order. The
    // same elements bound twice are how in-place kernels are written, and allowed.
    let arrays: Vec<(&Ident, bool)> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Input { name, .. } => Some((name, false)),
            Arg::Output { name, .. } => Some((name, true)),
            _ => None,
        })
        .collect();
    let mut alias_checks: Vec<TokenStream> = Vec::new();
    for (i, &(a, a_out)) in arrays.iter().enumerate() {
        for &(b, b_out) in &arrays[i + 1..] {
            if !(a_out || b_out) {
                continue;
            }
            let (w, r) = if a_out { (a, b) } else { (b, a) };
            let (ws, rs) = (w.to_string(), r.to_string());
            alias_checks.push(quote! {
                if #w.overlaps_partly(#r) {
                    return Err(#rt::Error::Kernel {
                        kernel: #reg_name.into(),
                        message: format!(
                            "tensor `{}` overlaps `{}` in part (views of one buffer) and the kernel writes `{}`: refused, its result would depend on the order units run in",
                            #ws, #rs, #ws
                        ),
                    });
                }
            });
        }
    }
    let launch_args: Vec<TokenStream> = sig
        .args
        .iter()
        .map(|a| match a {
            Arg::Input { name, .. } | Arg::Output { name, .. } => {
                quote!(#rt::cubecl::prelude::ArrayArg::from_raw_parts(#name.handle().clone(), #name.numel()))
            }
            Arg::Scalar { name, .. } | Arg::Comptime { name, .. } => quote!(#name),
        })
        .collect();
    // Storage buffers a launch binds: every array, plus cubecl's `info` buffer (scalars
    // and metadata; counted always, which can only refuse a kernel one buffer early).
    // wgpu counts them per shader stage.
    let buffer_count = sig
        .args
        .iter()
        .filter(|a| matches!(a, Arg::Input { .. } | Arg::Output { .. }))
        .count() as u32
        + 1;
    let outputs: Vec<&Ident> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Output { name, .. } => Some(name),
            _ => None,
        })
        .collect();
    // A candidate's check run writes fresh poisoned outputs (atomic ones stay the
    // caller's: counters that start from what the caller set).
    let fresh_outputs: Vec<Ident> = outputs
        .iter()
        .map(|o| format_ident!("__fresh_{}", o))
        .collect();
    let fresh_lets: Vec<TokenStream> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Output { name, elem, .. } => {
                let fresh = format_ident!("__fresh_{}", name);
                Some(match elem {
                    Elem::Atomic(_) => quote!(let #fresh = (*#name).clone();),
                    _ => quote!(let #fresh = #rt::Tensor::poisoned(client, #name.dtype(), #name.shape())?;),
                })
            }
            _ => None,
        })
        .collect();
    let bind_tunables = quote!(#(let #tunables: u32 = cfg.#tunables;)*);
    let bind_scalars: Vec<TokenStream> =
        scalars.iter().map(|(n, _)| quote!(let #n = #n;)).collect();
    // The grid in u64, checked against the device's limits at launch before it becomes
    // the u32 cube count (wgpu panics on a dispatch past its limits). Its expressions see
    // the tunables and the 32-bit integer scalars widened to 64 bits, so that a product
    // (`n_seq * max_q.div_ceil(BQ)`) past 2^32 is refused by that check instead of
    // wrapping to a small grid that skips work.
    let grid_exprs: Vec<TokenStream> = grid.iter().map(|e| quote!(((#e) as u64))).collect();
    let cube_exprs: Vec<TokenStream> = cube.iter().map(|e| quote!(((#e) as u32))).collect();
    let grid3 = match grid_exprs.len() {
        1 => quote!([#(#grid_exprs)*, 1u64, 1u64]),
        2 => quote!([#(#grid_exprs),*, 1u64]),
        _ => quote!([#(#grid_exprs),*]),
    };
    let cube_units = quote!(1u32 #(* #cube_exprs)*);
    let cube_dim = match cube_exprs.len() {
        1 => quote!(#rt::cubecl::prelude::CubeDim::new_1d(#(#cube_exprs)*)),
        2 => quote!(#rt::cubecl::prelude::CubeDim::new_2d(#(#cube_exprs),*)),
        _ => quote!(#rt::cubecl::prelude::CubeDim::new_3d(#(#cube_exprs),*)),
    };
    // `N: Size` arrays: the widest declared width dividing every one's length.
    let vector_args: Vec<&Ident> = sig
        .args
        .iter()
        .filter_map(|a| match a {
            Arg::Input { name, width: 0, .. } | Arg::Output { name, width: 0, .. } => Some(name),
            _ => None,
        })
        .collect();
    let vector_widths: Vec<u32> = args
        .vector
        .as_ref()
        .map(|(_, w)| w.clone())
        .unwrap_or_default();
    let vector_list = vector_widths
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join(" | ");
    let bind_vector = match vector_args.first() {
        Some(first) => {
            let first_str = first.to_string();
            quote! {
                let VECTOR: u32 = {
                    let __lens = [#(#vector_args.numel()),*];
                    [#(#vector_widths),*]
                        .into_iter()
                        .find(|w| __lens.iter().all(|l| l % (*w as usize) == 0))
                        .ok_or_else(|| #rt::Error::Shape {
                            tensor: #first_str.into(),
                            expected: format!("whose element count is divisible by one of the vector widths {}", #vector_list),
                            found: #rt::shape_str(#first.shape()),
                        })?
                };
            }
        }
        None => quote!(),
    };
    let widen_for_grid: Vec<TokenStream> = scalars
        .iter()
        .filter_map(|(n, ty)| match ty.to_string().as_str() {
            "u32" => Some(quote!(let #n: u64 = u64::from(#n);)),
            "i32" => Some(quote!(let #n: i64 = i64::from(#n);)),
            _ => None,
        })
        .chain(
            vector_args
                .first()
                .map(|_| quote!(let VECTOR: u64 = u64::from(VECTOR);)),
        )
        .collect();
    let vector_launch_arg = if sig.vector.is_some() {
        quote!(VECTOR as usize,)
    } else {
        quote!()
    };
    // The trailing comptime arguments, in the order they were appended to the kernel: the
    // tunables, then `local_scalars` (bound as `__local_scalars` at launch and emission).
    let mut trailing: Vec<TokenStream> = tunables.iter().map(|t| quote!(cfg.#t)).collect();
    if has_scalars {
        trailing.push(quote!(__local_scalars));
    }
    let kernel_dispatch = match &sig.generic {
        Some(_) => quote! {
            #rt::dispatch!(client, __c => #rt::with_float!(__dtype, __F => {
                // SAFETY: kiln kernels guard their own indices (launch_unchecked only
                // skips cubecl's bounds checks); arrays are bound with their lengths.
                unsafe { #kname::launch_unchecked::<__F, _>(__c, __count, __dim, #vector_launch_arg #(#launch_args,)* #(#trailing),*) };
                Ok(())
            }))
        },
        None => quote! {
            #rt::dispatch!(client, __c => {
                // SAFETY: as above.
                unsafe { #kname::launch_unchecked::<_>(__c, __count, __dim, #vector_launch_arg #(#launch_args,)* #(#trailing),*) };
                Ok::<(), #rt::Error>(())
            })
        },
    };

    let kernel_call = quote! {{
        // Scalars in locals on a CPU adapter (see the kernel's preamble).
        let __local_scalars: bool = client.report().adapter_type == #rt::AdapterType::Cpu;
        #kernel_dispatch
    }};

    // ---- space, key
    let value_lists: Vec<TokenStream> = args
        .tunables
        .iter()
        .map(|t| {
            let v = &t.values;
            quote!(&[#(#v),*])
        })
        .collect();
    let requires = &args.require;
    // Each clause as written, for the errors that name the one that fails.
    let require_texts: Vec<String> = requires.iter().map(|e| quote!(#e).to_string()).collect();
    // `device.has(Capability::X)` in `require`: the kernel's typed capabilities (a
    // tensor-core kernel is refused for WGSL, where it would write nothing).
    let mut caps = Capabilities(Vec::new());
    for e in requires {
        caps.visit_expr(e);
    }
    let capabilities = &caps.0;
    // What the autotuner may pick for some problem: the requirements that do not read
    // a runtime scalar (those may hold for another problem), with the `#[comptime]`
    // values bound (`declared`, for checks such as `kiln check-cuda`).
    let runtime_scalars: Vec<String> = scalars
        .iter()
        .filter(|(n, _)| !comptimes.iter().any(|(c, _)| c == n))
        .map(|(n, _)| n.to_string())
        .collect();
    let static_requires: Vec<&Expr> = requires
        .iter()
        .filter(|e| !mentions(e, &runtime_scalars))
        .collect();
    let static_units = if cube.iter().any(|e| mentions(e, &runtime_scalars)) {
        quote!(true)
    } else {
        quote!((#cube_units) <= device.max_units_per_cube)
    };
    let min_occupancy = args.occupancy.unwrap_or(0.0);
    let ct_names: Vec<&Ident> = comptimes.iter().map(|(n, _)| *n).collect();
    let ct_strs: Vec<String> = comptimes.iter().map(|(n, _)| n.to_string()).collect();
    let nest = nest_loops(
        &args,
        &tunables,
        &value_lists,
        quote! {
            let cfg = #config { #(#tunables),* };
            let _ = &cfg;
            if (#cube_units) <= device.max_units_per_cube #(&& (#requires))* {
                // On CUDA, configurations `kiln check-cuda` found to spill are left out
                // (the description formatted there only: `space` runs on every call).
                let __dropped = device.compute_capability.and_then(|_| {
                    let __desc = [#(format!("{}={}", #ct_strs, #ct_names),)* Self::label(&cfg)].join(" ");
                    #rt::budget::dropped_on(device, #reg_name, &__desc).map(|__why| (__desc, __why))
                });
                match __dropped {
                    Some((__desc, __why)) => #rt::budget::note(device, #reg_name, &__desc, __why),
                    None => __out.push(cfg),
                }
            }
        },
    );
    let declared_nest = nest_loops(
        &args,
        &tunables,
        &value_lists,
        quote! {
            let cfg = #config { #(#tunables),* };
            if #static_units #(&& (#static_requires))* {
                __out.push(vec![#((#tun_names, cfg.#tunables)),*]);
            }
        },
    );
    // Emission accepts a joint group's values only as one of its configurations.
    let joint_checks: Vec<TokenStream> = args
        .joint
        .iter()
        .map(|j| {
            let names: Vec<Ident> = j
                .names
                .iter()
                .map(|n| Ident::new(&n.to_string(), Span::call_site()))
                .collect();
            let tuples = j.tuples.iter().map(|v| quote!([#(#v),*]));
            let label = j
                .names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let listed = j
                .tuples
                .iter()
                .map(|v| {
                    format!(
                        "({})",
                        v.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .collect::<Vec<_>>()
                .join(" | ");
            let (width, count) = (j.names.len(), j.tuples.len());
            quote! {
                if !([#(#tuples),*] as [[u32; #width]; #count]).contains(&[#(cfg.#names),*]) {
                    return Err(#rt::Error::Param {
                        param: #label.into(),
                        expected: format!("one of the declared configurations {}", #listed),
                        found: format!("{:?}", [#(cfg.#names),*]),
                    });
                }
            }
        })
        .collect();
    let key_parts: Vec<TokenStream> = args
        .key
        .iter()
        .map(|k| {
            let n = &k.name;
            let s = n.to_string();
            if s == "dtype" {
                quote!(format!("dtype={}", __dtype))
            } else if k.bucket == Bucket::Pow2 {
                quote!(format!("{}={}", #s, (#n as usize).next_power_of_two()))
            } else {
                quote!(format!("{}={}", #s, #n))
            }
        })
        .collect();
    let key_parts: Vec<TokenStream> = key_parts
        .into_iter()
        .chain(comptimes.iter().map(|(n, _)| {
            let s = n.to_string();
            quote!(format!("{}={}", #s, #n))
        }))
        .collect();
    let label_parts: Vec<TokenStream> = tunables
        .iter()
        .map(|t| {
            let s = t.to_string();
            quote!(format!("{}={}", #s, cfg.#t))
        })
        .collect();

    // ---- emission (`kiln emit`): dtype and tunables from a KernelConfig
    let tunable_strs: Vec<String> = tun_names.clone();
    let tunable_defaults: Vec<String> = args
        .tunables
        .iter()
        .map(|t| t.values[0].to_string())
        .collect();
    let first_values: Vec<u32> = args.tunables.iter().map(|t| t.values[0]).collect();
    let tunable_values: Vec<String> = args
        .tunables
        .iter()
        .map(|t| {
            t.values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect();
    let define_args: Vec<TokenStream> = sig
        .args
        .iter()
        .map(|a| {
            let ty = |e: &Elem, width: u32| {
                let t = match e {
                    Elem::Generic => quote!(#kname::F),
                    Elem::Concrete(t) => quote!(#t),
                    Elem::Atomic(t) => quote!(#rt::cubecl::prelude::Atomic<#t>),
                };
                if width == 0 {
                    quote!(#rt::cubecl::prelude::Vector<#t, #kname::N>)
                } else if width > 1 {
                    let w = width as usize;
                    quote!(#rt::cubecl::prelude::Vector<#t, #rt::cubecl::prelude::Const<#w>>)
                } else {
                    t
                }
            };
            match a {
                Arg::Input { name, elem, width } => {
                    let t = ty(elem, *width);
                    quote!(let #name = #rt::define::input_array::<#t>(&mut __b);)
                }
                Arg::Output { name, elem, width } => {
                    let t = ty(elem, *width);
                    quote!(let #name = #rt::define::output_array::<#t>(&mut __b);)
                }
                Arg::Scalar { name, ty } => {
                    quote!(let #name = <#ty as #rt::cubecl::prelude::LaunchArg>::expand(&(), &mut __b);)
                }
                Arg::Comptime { name, ty } => {
                    let s = name.to_string();
                    quote!(let #name: #ty = cfg_in.get_param::<#ty>(#s)?;)
                }
            }
        })
        .collect();
    if let (Some(list), None) = (&args.dtypes, &sig.generic) {
        return Err(syn::Error::new(
            list[0].span(),
            format!("`dtypes`: `{kname}` has no float generic"),
        ));
    }
    let dtype_names: Vec<String> = match &args.dtypes {
        Some(list) => list.iter().map(|d| d.to_string()).collect(),
        None => vec!["f32".into(), "f16".into(), "bf16".into()],
    };
    let dtype_default = dtype_names[0].clone();
    let dtype_values = dtype_names.join(" | ");
    let dtype_param = if sig.generic.is_some() {
        quote!(#rt::ParamSpec { name: "dtype", default: #dtype_default, values: #dtype_values, doc: "element type" },)
    } else {
        quote!()
    };
    // A kernel that declares its dtypes refuses the others by name, at launch too.
    let dtype_refusal = if args.dtypes.is_some() {
        quote! {
            if ![#(#dtype_names),*].contains(&__dtype.name()) {
                return Err(#rt::Error::Param {
                    param: "dtype".into(),
                    expected: format!("{} (the dtypes kernel `{}` declares)", #dtype_values, #reg_name),
                    found: __dtype.to_string(),
                });
            }
        }
    } else {
        quote!()
    };
    let (define_dtype, define_register, expand_generic) = match &sig.generic {
        Some(_) => (
            quote! {
                let __text = cfg_in.get::<String>("dtype")?;
                let __dtype = match #rt::DType::parse(&__text) {
                    Ok(d) if d.is_float() => d,
                    _ => return Err(#rt::Error::Param { param: "dtype".into(), expected: #dtype_values.into(), found: __text }),
                };
                #dtype_refusal
            },
            quote!(#rt::define::register_float::<#kname::_F, __F>(&mut __b);),
            if sig.vector.is_some() {
                quote!(::<#kname::F, #kname::N>)
            } else {
                quote!(::<#kname::F>)
            },
        ),
        None => (
            quote!(let __dtype = #rt::DType::F32;),
            quote!(),
            if sig.vector.is_some() {
                quote!(::<#kname::N>)
            } else {
                quote!()
            },
        ),
    };
    // Emission: the vector width is a configuration knob.
    let (vector_param, define_vector, expand_vector) = if sig.vector.is_some() {
        let default = vector_widths.first().copied().unwrap_or(1).to_string();
        (
            quote!(#rt::ParamSpec { name: "vector", default: #default, values: #vector_list, doc: "vector width of the `N` arrays" },),
            quote! {
                let __w: u32 = cfg_in.get::<u32>("vector")?;
                if ![#(#vector_widths),*].contains(&__w) {
                    return Err(#rt::Error::Param { param: "vector".into(), expected: #vector_list.into(), found: __w.to_string() });
                }
            },
            quote!(__w as usize,),
        )
    } else {
        (quote!(), quote!(), quote!())
    };
    for (name, value) in &args.defaults {
        if !comptimes.iter().any(|(n, _)| *n == name) {
            return Err(syn::Error::new(
                name.span(),
                format!("`{name}` in `defaults` is not a #[comptime] argument of `{kname}`"),
            ));
        }
        // A default outside the declared domain would only fail at emission.
        let domain = args.domains.iter().find(|(d, _)| d == name).map(|(_, d)| d);
        if let (
            Some(d),
            Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(v),
                ..
            }),
        ) = (domain, value)
        {
            if !v.base10_parse::<u32>().is_ok_and(|v| d.contains(v)) {
                return Err(syn::Error::new(
                    syn::spanned::Spanned::span(value),
                    format!(
                        "the default of `{name}` must be one of its domain's values ({})",
                        d.text()
                    ),
                ));
            }
        }
    }
    let comptime_params: Vec<TokenStream> = comptimes
        .iter()
        .map(|(n, ty)| {
            let s = n.to_string();
            let given = args.defaults.iter().find(|(d, _)| d == *n).map(|(_, e)| quote!(#e).to_string().replace(' ', ""));
            let domain = args.domains.iter().find(|(d, _)| d == *n).map(|(_, d)| d);
            let default = match (given, domain) {
                (Some(d), _) => quote!(#d),
                (None, Some(d)) => {
                    let first = d.first().to_string();
                    quote!(#first)
                }
                (None, None) => quote!(<#ty as #rt::ComptimeParam>::DEFAULT),
            };
            let values = match domain {
                Some(d) => {
                    let text = d.text();
                    quote!(#text)
                }
                None => quote!(<#ty as #rt::ComptimeParam>::VALUES),
            };
            quote!(#rt::ParamSpec { name: #s, default: #default, values: #values, doc: "kernel specialisation" },)
        })
        .collect();
    let (define_local, local_param) = match has_scalars {
        true => (
            quote!(let __local_scalars: bool = cfg_in.get_param::<bool>("local_scalars")?;),
            quote!(#rt::ParamSpec { name: "local_scalars", default: "false", values: "false | true", doc: "a CPU adapter's form: scalar arguments copied into locals first, register-tile epilogues as loops over rows" },),
        ),
        false => (quote!(), quote!()),
    };
    let entry_suffix = if sig.vector.is_some() {
        quote!(format!("_v{}", __w))
    } else {
        quote!("")
    };
    let register_vector = if sig.vector.is_some() {
        quote!(__b.scope.register_size::<#kname::N>((__w as usize).into());)
    } else {
        quote!()
    };
    let define_body = quote! {
        #register_vector
        #(#define_args)*
        #define_local
        #kname::expand #expand_generic(&mut __b.scope, #expand_vector #(#host_names,)* #(#trailing),*);
        Ok(#rt::define::finish_with(__b, __entry, __dim))
    };
    let define_dispatch = match &sig.generic {
        Some(_) => quote!(#rt::with_float!(__dtype, __F => { #define_register #define_body })),
        None => quote!({ #define_body }),
    };

    let comptime_names: Vec<&Ident> = comptimes.iter().map(|(n, _)| *n).collect();
    let comptime_tys: Vec<&Ident> = comptimes.iter().map(|(_, t)| *t).collect();
    let comptime_strs: Vec<String> = comptimes.iter().map(|(n, _)| n.to_string()).collect();
    let problem_fields: Vec<TokenStream> = scalars
        .iter()
        .map(|(n, ty)| {
            let doc = if comptimes.iter().any(|(c, _)| c == n) {
                "A `#[comptime]` argument (one compiled variant per value)."
            } else {
                "A scalar argument."
            };
            quote!(#[doc = #doc] pub #n: #ty)
        })
        .collect();
    let scalar_names: Vec<&Ident> = scalars.iter().map(|(n, _)| *n).collect();
    // `FooProblem::default()`: what emission defaults to for `#[comptime]` u32 and
    // bool arguments (so `..Default::default()` launches), the type's default otherwise.
    let problem_defaults: Vec<TokenStream> = scalars
        .iter()
        .map(|(n, ty)| {
            let is_comptime = comptimes.iter().any(|(c, _)| c == n);
            let given = args.defaults.iter().find(|(d, _)| d == *n).map(|(_, e)| e);
            let domain = args.domains.iter().find(|(d, _)| d == *n).map(|(_, d)| d);
            let simple = *ty == "u32" || *ty == "bool";
            match (is_comptime && simple, given, domain) {
                (true, Some(e), _) => quote!(#e),
                (true, None, Some(d)) => {
                    let first = d.first();
                    quote!(#first)
                }
                _ => quote!(::core::default::Default::default()),
            }
        })
        .collect();
    let args_struct = format_ident!("{}Args", camel_name);
    let problem_struct = format_ident!("{}Problem", camel_name);
    let doc_args = format!("The arguments of kernel `{reg_name}` by name: its tensors, scalars and `#[comptime]` values (`launch`, `tuned`).");
    let doc_problem = format!("The problem of kernel `{reg_name}`: its scalar and `#[comptime]` arguments by name, what `space` and `key` read (`..Default::default()` fills the rest).");
    let rt_serde_path = format!("{rt}::serde").replace(' ', "");
    let doc_config = format!("A configuration of `{reg_name}`'s tunables.");
    let doc_host = format!("Host side of kernel `{reg_name}`: its tuning space, key, validated launch and autotuned launch.");
    let doc_spec = format!("Registry entry of kernel `{reg_name}` (emission without a device).");

    Ok(quote! {
        #[#rt::cubecl::prelude::cube(launch_unchecked)]
        #func

        #[doc = #doc_config]
        #[allow(non_snake_case)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, #rt::serde::Serialize, #rt::serde::Deserialize)]
        #[serde(crate = #rt_serde_path)]
        #vis struct #config {
            #(
                #[doc = "A tunable value."]
                pub #tunables: u32,
            )*
        }

        #[doc = #doc_args]
        #[derive(Clone, Copy)]
        #vis struct #args_struct<'a> {
            #(#host_params,)*
        }

        #[doc = #doc_problem]
        #[derive(Clone, Copy, Debug, PartialEq)]
        #vis struct #problem_struct {
            #(#problem_fields,)*
        }

        impl ::core::default::Default for #problem_struct {
            /// Scalars zero; each `#[comptime]` argument its emission default (its
            /// `defaults(..)` value, else its domain's first value).
            fn default() -> Self {
                Self { #(#scalar_names: #problem_defaults,)* }
            }
        }

        impl #args_struct<'_> {
            /// The scalar and `#[comptime]` arguments, as `space` and `key` take them.
            pub fn problem(&self) -> #problem_struct {
                #problem_struct { #(#scalar_names: self.#scalar_names),* }
            }
        }

        #[doc = #doc_host]
        #vis struct #host;

        #[allow(non_snake_case, clippy::too_many_arguments, unused_variables, dead_code)]
        impl #host {
            /// The registered name.
            pub const NAME: &'static str = #reg_name;
            /// Hash of the kernel's source text alone.
            pub const SOURCE_HASH: &'static str = #source_hash;

            /// Hash of the kernel's source and of the DSL sources it may call: keys the
            /// autotune cache, so editing either tunes anew.
            pub fn source_hash() -> String {
                #rt::tune::fnv1a_hex(&[Self::SOURCE_HASH, #dsl::SOURCE_HASH].concat())
            }

            /// Every configuration allowed on `client`'s device for these scalars, in
            /// declaration order (the first is what runs untuned).
            pub fn space(client: &#rt::Client, problem: &#problem_struct) -> Vec<#config> {
                let #problem_struct { #(#scalar_names),* } = *problem;
                #[allow(unused_imports)]
                use #rt::Capability;
                let device = client.report();
                let mut __out = Vec::new();
                #nest
                __out
            }

            /// The first of the kernel's limits that `cfg` does not meet on `device` for
            /// `problem` (units per cube, then each `require` clause as written), or
            /// `None` where it meets them all.
            pub fn unmet(device: &#rt::DeviceReport, cfg: &#config, problem: &#problem_struct) -> Option<String> {
                #[allow(unused_variables)]
                let #problem_struct { #(#scalar_names),* } = *problem;
                #[allow(unused_imports)]
                use #rt::Capability;
                #[allow(unused_variables)]
                let #config { #(#tunables),* } = *cfg;
                if !((#cube_units) <= device.max_units_per_cube) {
                    return Some(format!("{} units per cube (the device's limit: {})", #cube_units, device.max_units_per_cube));
                }
                #(
                    if !(#requires) {
                        return Some(format!("`require({})`", #require_texts));
                    }
                )*
                None
            }

            /// The declared configurations the autotuner may pick on `device` for some
            /// problem, with the `#[comptime]` values of `cfg_in` (requirements that
            /// read a runtime scalar are taken to hold), as `(tunable, value)` lists.
            pub fn declared(device: &#rt::DeviceReport, cfg_in: &#rt::KernelConfig) -> #rt::Result<Vec<Vec<(&'static str, u32)>>> {
                #[allow(unused_imports)]
                use #rt::Capability;
                #(let #comptime_names: #comptime_tys = cfg_in.get_param::<#comptime_tys>(#comptime_strs)?;)*
                #(#domain_checks)*
                let mut __out = Vec::new();
                #declared_nest
                Ok(__out)
            }

            /// The autotune key for a problem (scalars bucketed as declared).
            pub fn key(__dtype: #rt::DType, problem: &#problem_struct) -> #rt::tune::TuneKey {
                let #problem_struct { #(#scalar_names),* } = *problem;
                let __parts: Vec<String> = vec![#(#key_parts),*];
                #rt::tune::TuneKey { kernel: #reg_name, source_hash: Self::source_hash(), shape: __parts.join(";") }
            }

            /// `BM=64 TM=4`-style label of a configuration.
            pub fn label(cfg: &#config) -> String {
                let __parts: Vec<String> = vec![#(#label_parts),*];
                __parts.join(" ")
            }

            /// Launches with one configuration. Tensors are checked (device, contiguity,
            /// dtype) and errors name the argument; a configuration the device cannot
            /// run is refused.
            pub fn launch(client: &#rt::Client, cfg: &#config, args: &#args_struct<'_>) -> #rt::Result<()> {
                Self::launch_cubes(client, cfg, args, true).map(drop)
            }

            /// Compiles a configuration for the autotuner: [`Self::launch`] with only the
            /// grid's first cube (the compiled kernel does not depend on the grid), so that
            /// the configuration's next launch is its run alone. `false` (nothing
            /// launched) where the grid is empty. It writes part of the outputs, as a
            /// launch writes all of them.
            pub fn warm_up(client: &#rt::Client, cfg: &#config, args: &#args_struct<'_>) -> #rt::Result<bool> {
                Self::launch_cubes(client, cfg, args, false)
            }

            /// [`Self::launch`] over the whole grid (`__whole`) or its first cube only
            /// ([`Self::warm_up`]; `false` where the grid is empty, nothing launched).
            fn launch_cubes(client: &#rt::Client, cfg: &#config, args: &#args_struct<'_>, __whole: bool) -> #rt::Result<bool> {
                let #args_struct { #(#host_names,)* .. } = *args;
                let __dtype = #dtype_expr;
                #dtype_refusal
                #(#domain_checks)*
                #(#tensor_checks)*
                #(#alias_checks)*
                #[allow(unused_imports)]
                use #rt::Capability;
                let device = client.report();
                // A configuration built by hand: each value one the kernel declares.
                #(
                    if !(#value_lists as &[u32]).contains(&cfg.#tunables) {
                        return Err(#rt::Error::Param { param: #tunable_strs.into(), expected: #tunable_values.into(), found: cfg.#tunables.to_string() });
                    }
                )*
                #(#joint_checks)*
                #bind_tunables
                #(#bind_scalars)*
                if #buffer_count > device.max_bindings {
                    return Err(#rt::Error::Unsupported {
                        device: device.name.clone(),
                        feature: format!(
                            "kernel `{}` binds {} storage buffers; the device allows {} per shader stage",
                            #reg_name, #buffer_count, device.max_bindings
                        ),
                    });
                }
                if (#cube_units) > device.max_units_per_cube {
                    return Err(#rt::Error::Unsupported {
                        device: device.name.clone(),
                        feature: format!("{} units per cube ({})", #cube_units, Self::label(cfg)),
                    });
                }
                // The declared requirements hold at launch too (a tensor-core kernel must
                // never reach a device without them: on wgpu it would write nothing).
                #(
                    if !(#requires) {
                        return Err(#rt::Error::Unsupported {
                            device: device.name.clone(),
                            feature: format!(
                                "kernel `{}` with {} for {:?} (its `require({})` does not hold)",
                                #reg_name, Self::label(cfg), args.problem(), #require_texts
                            ),
                        });
                    }
                )*
                #bind_vector
                #[allow(unused_variables, clippy::unnecessary_cast)]
                let __grid: [u64; 3] = {
                    #(let #tunables: u64 = u64::from(cfg.#tunables);)*
                    #(#widen_for_grid)*
                    #grid3
                };
                let __max = device.max_cube_count;
                if __grid[0] > u64::from(__max.0) || __grid[1] > u64::from(__max.1) || __grid[2] > u64::from(__max.2) {
                    return Err(#rt::Error::Unsupported {
                        device: device.name.clone(),
                        feature: format!(
                            "a grid of {} x {} x {} cubes for kernel `{}` ({}): at most {} x {} x {} (a smaller problem, or one split into parts)",
                            __grid[0], __grid[1], __grid[2], #reg_name, Self::label(cfg), __max.0, __max.1, __max.2
                        ),
                    });
                }
                let mut __count = #rt::cubecl::prelude::CubeCount::Static(__grid[0] as u32, __grid[1] as u32, __grid[2] as u32);
                if !__whole {
                    match __count {
                        #rt::cubecl::prelude::CubeCount::Static(x, y, z) if x > 0 && y > 0 && z > 0 => {
                            __count = #rt::cubecl::prelude::CubeCount::Static(1, 1, 1);
                        }
                        _ => return Ok(false),
                    }
                }
                let __dim = #cube_dim;
                let __profile = if __whole { #rt::profile::start(client)? } else { None };
                let __launched: #rt::Result<()> = #kernel_call;
                __launched?;
                #rt::profile::finish(client, __profile, #reg_name, || Self::label(cfg))?;
                Ok(true)
            }

            /// Picks a configuration with the autotuner (tuning on first use of the key,
            /// validating every candidate's outputs against the first's within
            /// `tolerance`), launches it, and returns it. Each candidate's checked run
            /// writes fresh outputs filled with poison (NaN), so that one that skips an
            /// element fails the check; its timed runs and the winner's launch write the
            /// caller's outputs. The kernel must write its outputs from its inputs alone
            /// where it declares more than one configuration (timed runs repeat it;
            /// `Atomic` outputs are the caller's in every run).
            pub fn tuned(client: &#rt::Client, tolerance: impl Into<#rt::tune::Tolerance>, args: &#args_struct<'_>) -> #rt::Result<#config> {
                Self::tuned_ranked(client, tolerance, args, None)
            }

            /// [`Self::tuned`] with a cost model (`cost`: a configuration's estimated time in
            /// any unit, lower is better): a ranked search times only the best-ranked few
            /// (see `kiln_runtime::tune::Search`).
            pub fn tuned_ranked(
                client: &#rt::Client,
                tolerance: impl Into<#rt::tune::Tolerance>,
                args: &#args_struct<'_>,
                cost: Option<&dyn Fn(&#config) -> f64>,
            ) -> #rt::Result<#config> {
                Self::tuned_by(#rt::tune::Autotuner::global(), client, tolerance, args, cost)
            }

            /// [`Self::tuned_ranked`] with `tuner` (its cache, mode and observer) instead
            /// of the process-wide one.
            pub fn tuned_by(
                tuner: &#rt::tune::Autotuner,
                client: &#rt::Client,
                tolerance: impl Into<#rt::tune::Tolerance>,
                args: &#args_struct<'_>,
                cost: Option<&dyn Fn(&#config) -> f64>,
            ) -> #rt::Result<#config> {
                let #args_struct { #(#host_names,)* .. } = *args;
                let __dtype = #dtype_expr;
                let __space = Self::space(client, &args.problem());
                if __space.is_empty() {
                    // Say why, for the first declared values: the clause that fails.
                    let __first = #config { #(#tunables: #first_values),* };
                    let __why = Self::unmet(client.report(), &__first, &args.problem())
                        .unwrap_or_else(|| "a limit `kiln check-cuda` records for this device (it spills)".into());
                    return Err(#rt::Error::Unsupported {
                        device: client.report().name.clone(),
                        feature: format!(
                            "kernel `{}` for {:?}: no declared configuration fits (the first, {}, fails {})",
                            #reg_name, args.problem(), Self::label(&__first), __why
                        ),
                    });
                }
                let __key = Self::key(__dtype, &args.problem());
                let cfg = tuner.tune_warmed(
                    client,
                    &__key,
                    &__space,
                    Self::label,
                    |cfg| {
                        if #rt::tune::is_check_run() {
                            // Fresh poisoned outputs: what the candidate skips stays NaN.
                            #(#fresh_lets)*
                            #[allow(clippy::needless_update)]
                            let __check = #args_struct { #(#outputs: &#fresh_outputs,)* ..*args };
                            Self::launch(client, cfg, &__check)?;
                            return Ok(vec![#(#fresh_outputs),*]);
                        }
                        Self::launch(client, cfg, args)?;
                        Ok(vec![#((*#outputs).clone()),*])
                    },
                    tolerance,
                    cost.map(#rt::tune::Ranking::new),
                    Some(&|cfg| Self::warm_up(client, cfg, args)),
                )?;
                Self::launch(client, &cfg, args)?;
                Ok(cfg)
            }

            fn define(mut __b: #rt::cubecl::prelude::KernelBuilder, cfg_in: &#rt::KernelConfig) -> #rt::Result<#rt::cubecl::prelude::KernelDefinition> {
                #define_dtype
                let cfg = #config { #(#tunables: cfg_in.get::<u32>(#tunable_strs)?),* };
                #(
                    if !(#value_lists as &[u32]).contains(&cfg.#tunables) {
                        return Err(#rt::Error::Param { param: #tunable_strs.into(), expected: #tunable_values.into(), found: cfg.#tunables.to_string() });
                    }
                )*
                #(#joint_checks)*
                #bind_tunables
                #(let #comptime_names: #comptime_tys = cfg_in.get_param::<#comptime_tys>(#comptime_strs)?;)*
                #(#domain_checks)*
                let __dim = #cube_dim;
                #define_vector
                let __entry = format!("kiln_{}_{}_{}{}", #reg_name, __dtype, Self::label(&cfg).replace([' ', '='], "_"), #entry_suffix);
                #rt::define::begin(&mut __b);
                #define_dispatch
            }
        }

        #[doc = #doc_spec]
        #vis static #spec_static: #rt::KernelSpec = #rt::KernelSpec {
            name: #reg_name,
            summary: #summary,
            config: &[
                #dtype_param
                #vector_param
                #(#comptime_params)*
                #(#rt::ParamSpec { name: #tunable_strs, default: #tunable_defaults, values: #tunable_values, doc: "tunable" },)*
                #local_param
            ],
            define: #host::define,
            declared: #host::declared,
            min_occupancy: #min_occupancy,
            capabilities: &[#(#rt::Capability::#capabilities),*],
            source_hash: #host::source_hash,
        };

        #rt::inventory::submit! {
            #rt::KernelEntry { spec: &#spec_static, module: ::core::module_path!() }
        }
    })
}

/// Loops over the tunables (outermost first, in declaration order) around `body`: a
/// joint group loops over its configurations where its first name is declared; its
/// other names add no loop.
fn nest_loops(
    args: &KernelArgs,
    tunables: &[&Ident],
    value_lists: &[TokenStream],
    body: TokenStream,
) -> TokenStream {
    let mut nest = body;
    let joint_of = |name: &Ident| {
        args.joint
            .iter()
            .find(|j| j.names.iter().any(|n| n == name))
    };
    for (t, list) in tunables.iter().zip(value_lists).rev() {
        match joint_of(t) {
            None => {
                nest = quote! {
                    for &#t in (#list as &[u32]) {
                        #nest
                    }
                };
            }
            Some(j) if j.names[0] == **t => {
                let names: Vec<Ident> = j
                    .names
                    .iter()
                    .map(|n| Ident::new(&n.to_string(), Span::call_site()))
                    .collect();
                let tuples = j.tuples.iter().map(|v| quote!([#(#v),*]));
                let (width, count) = (j.names.len(), j.tuples.len());
                nest = quote! {
                    for &[#(#names),*] in ([#(#tuples),*] as [[u32; #width]; #count]).iter() {
                        #nest
                    }
                };
            }
            Some(_) => {}
        }
    }
    nest
}
