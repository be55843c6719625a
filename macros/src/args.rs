//! Parsing `#[kiln::kernel(...)]`'s arguments.

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{bracketed, parenthesized, Expr, Ident, LitInt, LitStr, Token};

/// One tunable: `BM = [32, 64, 128]`.
pub struct Tunable {
    pub name: Ident,
    pub values: Vec<u32>,
}

/// Tunables chosen together from a list of configurations (Triton's `configs`):
/// `(BM, BN, TM) = [(64, 64, 4), (16, 256, 1)]`. Each name is also a [`Tunable`]
/// whose values are the distinct values it takes in the list.
pub struct Joint {
    pub names: Vec<Ident>,
    pub tuples: Vec<Vec<u32>>,
}

/// How a key dimension is bucketed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Rounded up to a power of two.
    Pow2,
    /// As is.
    Exact,
}

/// One key entry: a scalar argument and its bucketing, or `dtype`.
pub struct KeyItem {
    pub name: Ident,
    pub bucket: Bucket,
}

/// The values a `#[comptime] u32` argument may take: a list or an inclusive range.
pub enum Domain {
    /// `[16, 32, 64]`.
    List(Vec<u32>),
    /// `1..=1024`.
    Range(u32, u32),
}

impl Domain {
    /// How `kiln emit --list` and errors write it.
    pub fn text(&self) -> String {
        match self {
            Domain::List(v) => v
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            Domain::Range(a, b) => format!("{a}..={b}"),
        }
    }

    /// The first value (the default when `defaults` names none).
    pub fn first(&self) -> u32 {
        match self {
            Domain::List(v) => v[0],
            Domain::Range(a, _) => *a,
        }
    }

    /// Whether `v` is one of the values.
    pub fn contains(&self, v: u32) -> bool {
        match self {
            Domain::List(l) => l.contains(&v),
            Domain::Range(a, b) => (*a..=*b).contains(&v),
        }
    }

    fn parse(name: &Ident, e: &Expr) -> syn::Result<Domain> {
        let lit = |e: &Expr| -> syn::Result<u32> {
            match e {
                Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Int(i),
                    ..
                }) => i.base10_parse::<u32>(),
                other => Err(syn::Error::new_spanned(
                    other,
                    "expected an integer literal",
                )),
            }
        };
        match e {
            Expr::Array(a) if !a.elems.is_empty() => {
                Ok(Domain::List(a.elems.iter().map(lit).collect::<syn::Result<_>>()?))
            }
            Expr::Range(r) if matches!(r.limits, syn::RangeLimits::Closed(_)) => {
                match (&r.start, &r.end) {
                    (Some(a), Some(b)) => {
                        let (a, b) = (lit(a)?, lit(b)?);
                        if a > b {
                            return Err(syn::Error::new_spanned(e, "an empty range"));
                        }
                        Ok(Domain::Range(a, b))
                    }
                    _ => Err(syn::Error::new_spanned(e, "a range needs both ends: `1..=256`")),
                }
            }
            _ => Err(syn::Error::new(
                name.span(),
                format!("the domain of `{name}` is a list `[16, 32, 64]` or an inclusive range `1..=256`"),
            )),
        }
    }
}

/// Everything the attribute declares.
pub struct KernelArgs {
    pub tunables: Vec<Tunable>,
    /// Groups of tunables declared together; their names are in `tunables` too.
    pub joint: Vec<Joint>,
    pub require: Vec<Expr>,
    pub key: Vec<KeyItem>,
    pub grid: Option<Vec<Expr>>,
    pub cube: Option<Vec<Expr>>,
    pub name: Option<LitStr>,
    /// Emission defaults of `#[comptime]` arguments (`defaults(chunk = 64)`).
    pub defaults: Vec<(Ident, Expr)>,
    /// Vector widths of the kernel's `N: Size` generic, widest first (`vector = [4, 2, 1]`):
    /// at launch, the widest that divides every `Array<Vector<_, N>>` argument's length.
    pub vector: Option<(Span, Vec<u32>)>,
    /// `dtypes = [f16, bf16]`: the float types the kernel accepts (default: all three);
    /// others are refused by name at emission and launch.
    pub dtypes: Option<Vec<Ident>>,
    /// `domain(kp = [16, 32], dk = 1..=1024)`: the values of `#[comptime] u32`
    /// arguments, checked before expansion (emission) and at launch.
    pub domains: Vec<(Ident, Domain)>,
    /// `occupancy = 0.25`: the least fraction of an SM's threads the kernel must keep
    /// resident on CUDA as far as registers allow (`kiln check-cuda` enforces it).
    pub occupancy: Option<f64>,
}

fn tuple_or_single(e: Expr) -> Vec<Expr> {
    match e {
        Expr::Tuple(t) => t.elems.into_iter().collect(),
        Expr::Paren(p) => vec![*p.expr],
        other => vec![other],
    }
}

impl KernelArgs {
    /// `(A, B) = [(1, 2), (3, 4)]` inside `tune(...)`.
    fn parse_joint(&mut self, content: ParseStream) -> syn::Result<()> {
        let names_in;
        let open = parenthesized!(names_in in content);
        let names: Vec<Ident> = Punctuated::<Ident, Token![,]>::parse_terminated(&names_in)?
            .into_iter()
            .collect();
        if names.len() < 2 {
            return Err(syn::Error::new(
                open.span.join(),
                "a tunable group names at least two tunables: `(BM, BN) = [(64, 64), ...]`",
            ));
        }
        content.parse::<Token![=]>()?;
        let list;
        let brackets = bracketed!(list in content);
        let mut tuples = Vec::new();
        while !list.is_empty() {
            let tuple_in;
            let paren = parenthesized!(tuple_in in list);
            let lits = Punctuated::<LitInt, Token![,]>::parse_terminated(&tuple_in)?;
            if lits.len() != names.len() {
                return Err(syn::Error::new(
                    paren.span.join(),
                    format!(
                        "this configuration has {} values for {} tunables ({})",
                        lits.len(),
                        names.len(),
                        names
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            tuples.push(
                lits.iter()
                    .zip(&names)
                    .map(|(l, n)| tunable_value(n, l))
                    .collect::<syn::Result<Vec<_>>>()?,
            );
            if !list.is_empty() {
                list.parse::<Token![,]>()?;
            }
        }
        if tuples.is_empty() {
            return Err(syn::Error::new(
                brackets.span.join(),
                "this tunable group has no configurations",
            ));
        }
        for (i, name) in names.iter().enumerate() {
            if self.tunables.iter().any(|t| t.name == *name) || names[..i].contains(name) {
                return Err(syn::Error::new(
                    name.span(),
                    format!("tunable `{name}` is declared twice"),
                ));
            }
            let mut values: Vec<u32> = Vec::new();
            for t in &tuples {
                if !values.contains(&t[i]) {
                    values.push(t[i]);
                }
            }
            self.tunables.push(Tunable {
                name: name.clone(),
                values,
            });
        }
        self.joint.push(Joint { names, tuples });
        Ok(())
    }
}

impl Parse for KernelArgs {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut args = KernelArgs {
            tunables: vec![],
            joint: vec![],
            require: vec![],
            key: vec![],
            grid: None,
            cube: None,
            name: None,
            defaults: vec![],
            vector: None,
            dtypes: None,
            domains: vec![],
            occupancy: None,
        };
        while !input.is_empty() {
            let section: Ident = input.parse()?;
            match section.to_string().as_str() {
                "tune" => {
                    let content;
                    parenthesized!(content in input);
                    while !content.is_empty() {
                        if content.peek(syn::token::Paren) {
                            args.parse_joint(&content)?;
                            if !content.is_empty() {
                                content.parse::<Token![,]>()?;
                            }
                            continue;
                        }
                        let name: Ident = content.parse()?;
                        content.parse::<Token![=]>()?;
                        let list;
                        bracketed!(list in content);
                        let lits = Punctuated::<LitInt, Token![,]>::parse_terminated(&list)?;
                        if lits.is_empty() {
                            return Err(syn::Error::new(name.span(), format!("tunable `{name}` has no values")));
                        }
                        if args.tunables.iter().any(|t| t.name == name) {
                            return Err(syn::Error::new(name.span(), format!("tunable `{name}` is declared twice")));
                        }
                        let values = lits.iter().map(|l| tunable_value(&name, l)).collect::<syn::Result<Vec<_>>>()?;
                        args.tunables.push(Tunable { name, values });
                        if !content.is_empty() {
                            content.parse::<Token![,]>()?;
                        }
                    }
                }
                "require" => {
                    let content;
                    parenthesized!(content in input);
                    args.require.extend(Punctuated::<Expr, Token![,]>::parse_terminated(&content)?);
                }
                "key" => {
                    let content;
                    parenthesized!(content in input);
                    while !content.is_empty() {
                        let name: Ident = content.parse()?;
                        let bucket = if content.peek(Token![=]) {
                            content.parse::<Token![=]>()?;
                            let b: Ident = content.parse()?;
                            match b.to_string().as_str() {
                                "pow2" => Bucket::Pow2,
                                "exact" => Bucket::Exact,
                                other => {
                                    return Err(syn::Error::new(
                                        b.span(),
                                        format!("unknown bucketing `{other}`: expected `pow2` or `exact`"),
                                    ))
                                }
                            }
                        } else {
                            Bucket::Exact
                        };
                        args.key.push(KeyItem { name, bucket });
                        if !content.is_empty() {
                            content.parse::<Token![,]>()?;
                        }
                    }
                }
                "grid" | "cube" => {
                    input.parse::<Token![=]>()?;
                    let e: Expr = input.parse()?;
                    let v = tuple_or_single(e);
                    if v.is_empty() || v.len() > 3 {
                        return Err(syn::Error::new(section.span(), format!("`{section}` takes one to three expressions")));
                    }
                    if section == "grid" {
                        args.grid = Some(spread_cubes(v)?);
                    } else {
                        args.cube = Some(v);
                    }
                }
                "name" => {
                    input.parse::<Token![=]>()?;
                    args.name = Some(input.parse()?);
                }
                "vector" => {
                    input.parse::<Token![=]>()?;
                    let list;
                    let brackets = bracketed!(list in input);
                    let lits = Punctuated::<LitInt, Token![,]>::parse_terminated(&list)?;
                    let widths = lits
                        .iter()
                        .map(|l| l.base10_parse::<u32>())
                        .collect::<syn::Result<Vec<_>>>()?;
                    // Widest first, each once: the first that divides is what runs, so an
                    // ascending list would always run its narrowest.
                    let descending = widths.windows(2).all(|w| w[0] > w[1]);
                    if widths.is_empty()
                        || !descending
                        || widths.iter().any(|w| ![1, 2, 4, 8].contains(w))
                    {
                        return Err(syn::Error::new(
                            brackets.span.join(),
                            "`vector` lists distinct widths among 1, 2, 4 and 8, widest first (`vector = [4, 2, 1]`): the first that divides every `N` array's length runs",
                        ));
                    }
                    args.vector = Some((section.span(), widths));
                }
                "dtypes" => {
                    input.parse::<Token![=]>()?;
                    let list;
                    let brackets = bracketed!(list in input);
                    let names = Punctuated::<Ident, Token![,]>::parse_terminated(&list)?;
                    if names.is_empty() {
                        return Err(syn::Error::new(brackets.span.join(), "`dtypes` lists at least one of f32, f16, bf16"));
                    }
                    for n in &names {
                        if !["f32", "f16", "bf16"].contains(&n.to_string().as_str()) {
                            return Err(syn::Error::new(n.span(), format!("unknown dtype `{n}`: expected f32, f16 or bf16")));
                        }
                    }
                    args.dtypes = Some(names.into_iter().collect());
                }
                "occupancy" => {
                    input.parse::<Token![=]>()?;
                    let lit: syn::LitFloat = input.parse()?;
                    let v: f64 = lit.base10_parse()?;
                    if !(v > 0.0 && v <= 1.0) {
                        return Err(syn::Error::new(lit.span(), "`occupancy` is a fraction of an SM's threads in (0, 1]"));
                    }
                    args.occupancy = Some(v);
                }
                "domain" => {
                    let content;
                    parenthesized!(content in input);
                    while !content.is_empty() {
                        let name: Ident = content.parse()?;
                        content.parse::<Token![=]>()?;
                        let e: Expr = content.parse()?;
                        if args.domains.iter().any(|(n, _)| *n == name) {
                            return Err(syn::Error::new(name.span(), format!("the domain of `{name}` is declared twice")));
                        }
                        let d = Domain::parse(&name, &e)?;
                        args.domains.push((name, d));
                        if !content.is_empty() {
                            content.parse::<Token![,]>()?;
                        }
                    }
                }
                "defaults" => {
                    let content;
                    parenthesized!(content in input);
                    while !content.is_empty() {
                        if content.peek(syn::token::Paren) {
                            // A joint group declares tunables: not a default.
                            let group;
                            let paren = parenthesized!(group in content);
                            let _ = group.parse::<proc_macro2::TokenStream>();
                            return Err(syn::Error::new(
                                paren.span.join(),
                                "`defaults` takes `name = value` pairs for `#[comptime]` arguments; a joint group `(A, B) = [...]` declares tunables and belongs in `tune(...)`",
                            ));
                        }
                        let name: Ident = content.parse()?;
                        content.parse::<Token![=]>()?;
                        let value: Expr = content.parse()?;
                        args.defaults.push((name, value));
                        if !content.is_empty() {
                            content.parse::<Token![,]>()?;
                        }
                    }
                }
                other => {
                    return Err(syn::Error::new(
                        section.span(),
                        format!("unknown `#[kiln::kernel]` section `{other}`: expected tune, require, key, grid, cube, name, defaults, vector, dtypes, domain or occupancy"),
                    ))
                }
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        if args.grid.is_none() {
            return Err(syn::Error::new(
                Span::call_site(),
                "missing `grid = (...)`: the number of cubes, from the shape and tunables",
            ));
        }
        if args.cube.is_none() {
            return Err(syn::Error::new(
                Span::call_site(),
                "missing `cube = ...`: the units per cube, from the tunables",
            ));
        }
        Ok(args)
    }
}

/// `grid = cubes(n)`: `n` cubes over a one-dimensional problem, laid out as
/// `(min(n, 65535), ceil(n / 65535))` because a grid dimension holds at most 65535 cubes
/// on some backends (kernels index them with the DSL's `linear_unit`/`linear_cube`).
fn spread_cubes(v: Vec<Expr>) -> syn::Result<Vec<Expr>> {
    if let [Expr::Call(call)] = v.as_slice() {
        if matches!(&*call.func, Expr::Path(p) if p.path.is_ident("cubes")) {
            let [n] = call.args.iter().collect::<Vec<_>>()[..] else {
                return Err(syn::Error::new_spanned(
                    call,
                    "`cubes` takes one expression, the number of cubes: `grid = cubes(len.div_ceil(UNITS))`",
                ));
            };
            return Ok(vec![
                syn::parse_quote!((#n).min(65_535)),
                syn::parse_quote!((#n).div_ceil(65_535)),
            ]);
        }
    }
    Ok(v)
}

/// A tunable's value: a positive integer (tunables are sizes and counts; a 0 would
/// divide by zero in a grid or a tile).
fn tunable_value(name: &Ident, lit: &LitInt) -> syn::Result<u32> {
    match lit.base10_parse::<u32>()? {
        0 => Err(syn::Error::new(
            lit.span(),
            format!("tunable `{name}` has the value 0: tunables are sizes and counts, at least 1"),
        )),
        v => Ok(v),
    }
}
