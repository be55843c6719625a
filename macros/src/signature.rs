//! What `#[kiln::kernel]` needs to know of the kernel function's signature.

use syn::{FnArg, GenericParam, Ident, ItemFn, Pat, Type, TypeParamBound};

/// The element type of an array argument.
#[derive(Clone)]
pub enum Elem {
    /// The kernel's float generic (`F`): dispatched on the tensors' dtype.
    Generic,
    /// A concrete type (`f32`, `u32`, `i32`, ...).
    Concrete(Ident),
    /// `Atomic<u32>` or `Atomic<i32>` (outputs only, one element wide): the tensor's
    /// dtype is the inner type's.
    Atomic(Ident),
}

/// One kernel argument.
pub enum Arg {
    /// `&Array<T>`, or `&Array<Vector<T, Const<W>>>` (`width` W, else 1), or
    /// `&Array<Vector<T, N>>` with the kernel's `N: Size` (`width` 0: chosen at launch).
    Input { name: Ident, elem: Elem, width: u32 },
    /// `&mut Array<T>`, or `&mut Array<Vector<T, Const<W>>>`.
    Output { name: Ident, elem: Elem, width: u32 },
    /// `u32`, `i32` or `f32` by value.
    Scalar { name: Ident, ty: Ident },
    /// `#[comptime] bool` or `#[comptime] u32`: a caller-chosen specialisation (part of
    /// the tune key and of the emission config).
    Comptime { name: Ident, ty: Ident },
}

impl Arg {
    pub fn name(&self) -> &Ident {
        match self {
            Arg::Input { name, .. }
            | Arg::Output { name, .. }
            | Arg::Scalar { name, .. }
            | Arg::Comptime { name, .. } => name,
        }
    }
}

/// The analysed signature.
pub struct Signature {
    pub name: Ident,
    /// The float generic, if any.
    pub generic: Option<Ident>,
    /// The vector-width generic (`N: Size`), if any.
    pub vector: Option<Ident>,
    pub args: Vec<Arg>,
}

const ARG_HELP: &str =
    "#[kiln::kernel] arguments must be `&Array<T>`, `&mut Array<T>` (T a scalar or `Vector<T, Const<2 | 4 | 8>>`), `&mut Array<Atomic<u32 | i32>>` or a `u32`, `i32` or `f32` scalar";

fn scalar_elem(ty: &Type, generic: &Option<Ident>) -> Option<Elem> {
    let Type::Path(inner) = ty else { return None };
    let id = inner.path.get_ident()?.clone();
    if generic.as_ref() == Some(&id) {
        Some(Elem::Generic)
    } else if ["f32", "f16", "bf16", "u32", "i32", "u8", "i8"].contains(&id.to_string().as_str()) {
        Some(Elem::Concrete(id))
    } else {
        None
    }
}

fn angle_args(ty: &Type, name: &str) -> Option<Vec<syn::GenericArgument>> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    if seg.ident != name {
        return None;
    }
    let syn::PathArguments::AngleBracketed(a) = &seg.arguments else {
        return None;
    };
    Some(a.args.iter().cloned().collect())
}

/// `Array<T>` -> (T, 1); `Array<Vector<T, Const<W>>>` -> (T, W) for W in 2, 4, 8;
/// `Array<Vector<T, N>>` with the kernel's `N: Size` -> (T, 0).
fn array_elem(ty: &Type, generic: &Option<Ident>, vector: &Option<Ident>) -> Option<(Elem, u32)> {
    let args = angle_args(ty, "Array")?;
    let Some(syn::GenericArgument::Type(inner)) = args.first() else {
        return None;
    };
    if let Some(elem) = scalar_elem(inner, generic) {
        return Some((elem, 1));
    }
    if let Some(a) = angle_args(inner, "Atomic") {
        let [syn::GenericArgument::Type(Type::Path(t))] = a.as_slice() else {
            return None;
        };
        let id = t.path.get_ident()?;
        return (id == "u32" || id == "i32").then(|| (Elem::Atomic(id.clone()), 1));
    }
    let v = angle_args(inner, "Vector")?;
    let [syn::GenericArgument::Type(t), syn::GenericArgument::Type(size)] = v.as_slice() else {
        return None;
    };
    if let Type::Path(p) = size {
        if p.path
            .get_ident()
            .is_some_and(|i| vector.as_ref() == Some(i))
        {
            return Some((scalar_elem(t, generic)?, 0));
        }
    }
    let c = angle_args(size, "Const")?;
    let Some(syn::GenericArgument::Const(syn::Expr::Lit(lit))) = c.first() else {
        return None;
    };
    let syn::Lit::Int(width) = &lit.lit else {
        return None;
    };
    let width: u32 = width.base10_parse().ok()?;
    if ![2, 4, 8].contains(&width) {
        return None;
    }
    Some((scalar_elem(t, generic)?, width))
}

pub fn analyse(f: &ItemFn) -> syn::Result<Signature> {
    let mut generic = None;
    let mut vector = None;
    for g in &f.sig.generics.params {
        match g {
            GenericParam::Type(t)
                if vector.is_none()
                    && t.bounds.iter().any(|b| matches!(b, TypeParamBound::Trait(tr) if tr.path.segments.last().is_some_and(|s| s.ident == "Size"))) =>
            {
                vector = Some(t.ident.clone());
            }
            GenericParam::Type(t)
                if generic.is_none()
                    && t.bounds.iter().any(|b| matches!(b, TypeParamBound::Trait(tr) if tr.path.segments.last().is_some_and(|s| s.ident == "Float"))) =>
            {
                generic = Some(t.ident.clone());
            }
            other => {
                return Err(syn::Error::new_spanned(other, "#[kiln::kernel] supports one `F: Float` generic and one `N: Size` generic (vector width)"));
            }
        }
    }
    let mut args = Vec::new();
    for input in &f.sig.inputs {
        let FnArg::Typed(pt) = input else {
            return Err(syn::Error::new_spanned(
                input,
                "#[kiln::kernel] takes a free function",
            ));
        };
        let comptime = pt.attrs.iter().any(|a| a.path().is_ident("comptime"));
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new_spanned(
                &pt.pat,
                "expected an argument name",
            ));
        };
        let name = pi.ident.clone();
        if comptime {
            // `bool`, `u32`, or an enum (any other single name: the expansion requires
            // `ComptimeParam` of it, which `comptime_enum!` implements). Other
            // primitives are refused here: a float has no exact identity to key on.
            const OTHER_PRIMITIVES: [&str; 11] = [
                "f32", "f64", "f16", "i8", "i16", "i32", "i64", "u8", "u16", "u64", "usize",
            ];
            let ty = match &*pt.ty {
                Type::Path(p)
                    if p.qself.is_none()
                        && p.path.get_ident().is_some_and(|i| {
                            !OTHER_PRIMITIVES.iter().any(|o| i == o)
                        }) =>
                {
                    p.path.get_ident().cloned().unwrap_or_else(|| unreachable!())
                }
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "#[comptime] parameters of a #[kiln::kernel] must be `bool`, `u32` or an enum declared with `comptime_enum!` (tunables go in `tune(...)`)",
                    ))
                }
            };
            args.push(Arg::Comptime { name, ty });
            continue;
        }
        let arg = match &*pt.ty {
            Type::Reference(r) => {
                let (elem, width) = array_elem(&r.elem, &generic, &vector)
                    .ok_or_else(|| syn::Error::new_spanned(&pt.ty, ARG_HELP))?;
                if matches!(elem, Elem::Atomic(_)) && r.mutability.is_none() {
                    return Err(syn::Error::new_spanned(
                        &pt.ty,
                        "an atomic array argument of a #[kiln::kernel] must be an output: `&mut Array<Atomic<u32 | i32>>`",
                    ));
                }
                if r.mutability.is_some() {
                    Arg::Output { name, elem, width }
                } else {
                    Arg::Input { name, elem, width }
                }
            }
            Type::Path(p)
                if p.path
                    .get_ident()
                    .is_some_and(|i| i == "u32" || i == "i32" || i == "f32") =>
            {
                Arg::Scalar {
                    name,
                    ty: p
                        .path
                        .get_ident()
                        .cloned()
                        .unwrap_or_else(|| unreachable!()),
                }
            }
            other => return Err(syn::Error::new_spanned(other, ARG_HELP)),
        };
        args.push(arg);
    }
    if !args.iter().any(|a| matches!(a, Arg::Output { .. })) {
        return Err(syn::Error::new_spanned(
            &f.sig,
            "a #[kiln::kernel] needs at least one `&mut Array<T>` output",
        ));
    }
    if generic.is_some()
        && !args.iter().any(|a| {
            matches!(
                a,
                Arg::Input {
                    elem: Elem::Generic,
                    ..
                } | Arg::Output {
                    elem: Elem::Generic,
                    ..
                }
            )
        })
    {
        return Err(syn::Error::new_spanned(
            &f.sig.generics,
            "the float generic must type at least one array argument",
        ));
    }
    Ok(Signature {
        name: f.sig.ident.clone(),
        generic,
        vector,
        args,
    })
}
