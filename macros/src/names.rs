//! Helpers of the `#[kiln::kernel]` expansion: crate paths in the caller, identifier
//! checks for host-side expressions, generated names and the source hash.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::visit::Visit;
use syn::{Expr, Ident};

/// Path of kiln's runtime in the calling crate: `::kiln::runtime` for users of the
/// facade, `::kiln_runtime` inside kiln's own operator library.
pub fn runtime_path() -> TokenStream {
    use proc_macro_crate::{crate_name, FoundCrate};
    match crate_name("kiln") {
        Ok(FoundCrate::Itself) => quote!(::kiln::runtime),
        Ok(FoundCrate::Name(n)) => {
            let id = Ident::new(&n, Span::call_site());
            quote!(::#id::runtime)
        }
        Err(_) => match crate_name("kiln-runtime") {
            Ok(FoundCrate::Name(n)) => {
                let id = Ident::new(&n, Span::call_site());
                quote!(::#id)
            }
            _ => quote!(::kiln_runtime),
        },
    }
}

/// Path of kiln's DSL in the calling crate (its `SOURCE_HASH` keys the tune cache).
pub fn dsl_path() -> TokenStream {
    use proc_macro_crate::{crate_name, FoundCrate};
    match crate_name("kiln") {
        Ok(FoundCrate::Itself) => quote!(::kiln::dsl),
        Ok(FoundCrate::Name(n)) => {
            let id = Ident::new(&n, Span::call_site());
            quote!(::#id::dsl)
        }
        Err(_) => match crate_name("kiln-dsl") {
            Ok(FoundCrate::Name(n)) => {
                let id = Ident::new(&n, Span::call_site());
                quote!(::#id)
            }
            _ => quote!(::kiln_dsl),
        },
    }
}

/// The capabilities a `require` list asks for: every `device.has(Capability::X)`.
pub struct Capabilities(pub Vec<Ident>);

impl<'a> Visit<'a> for Capabilities {
    fn visit_expr_method_call(&mut self, m: &'a syn::ExprMethodCall) {
        if m.method == "has" && m.args.len() == 1 {
            if let Some(Expr::Path(p)) = m.args.first() {
                let segs: Vec<&syn::PathSegment> = p.path.segments.iter().collect();
                if segs.len() == 2
                    && segs[0].ident == "Capability"
                    && !self.0.contains(&segs[1].ident)
                {
                    self.0.push(segs[1].ident.clone());
                }
            }
        }
        syn::visit::visit_expr_method_call(self, m);
    }
}

/// Collects the free identifiers of an expression (not called functions, not methods,
/// not fields, not multi-segment paths).
struct FreeIdents(Vec<Ident>);

impl<'a> Visit<'a> for FreeIdents {
    fn visit_expr_call(&mut self, c: &'a syn::ExprCall) {
        // `ceil_div(n, BN)`: the callee is a function, its arguments are checked.
        for a in &c.args {
            self.visit_expr(a);
        }
    }
    fn visit_expr_path(&mut self, p: &'a syn::ExprPath) {
        if let Some(id) = p.path.get_ident() {
            self.0.push(id.clone());
        }
    }
}

/// Whether `expr` mentions any of `names` as a free identifier.
pub fn mentions(expr: &Expr, names: &[String]) -> bool {
    let mut v = FreeIdents(vec![]);
    v.visit_expr(expr);
    v.0.iter().any(|id| names.contains(&id.to_string()))
}

pub fn check_idents(
    exprs: &[Expr],
    allowed: &[String],
    section: &str,
    what: &str,
) -> syn::Result<()> {
    for e in exprs {
        let mut v = FreeIdents(vec![]);
        v.visit_expr(e);
        for id in v.0 {
            if !allowed.contains(&id.to_string()) {
                return Err(syn::Error::new(
                    id.span(),
                    format!("`{id}` in `{section}` is not {what}"),
                ));
            }
        }
    }
    Ok(())
}

pub fn camel(s: &str) -> String {
    s.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| p[..1].to_uppercase() + &p[1..])
        .collect()
}

pub fn fnv1a(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Gives every token in `tokens` the hygiene of the attribute's call site, keeping
/// its source location (for errors): the kernel then reads as if written in one piece
/// where the attribute stands, even when a `macro_rules!` pasted it together from its
/// own template (the signature) and the caller's tokens (tunables, `require`, body).
/// macro_rules hygiene would otherwise keep a parameter the template declares apart
/// from the same name in the caller's body, and cubecl's `#[cube]` expansion, which
/// introduces its own bindings at the tokens' spans, apart from itself.
pub fn respan_to_call_site(tokens: TokenStream) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    tokens
        .into_iter()
        .map(|tt| match tt {
            TokenTree::Group(g) => {
                let mut out = Group::new(g.delimiter(), respan_to_call_site(g.stream()));
                out.set_span(g.span().resolved_at(Span::call_site()));
                TokenTree::Group(out)
            }
            mut other => {
                other.set_span(other.span().resolved_at(Span::call_site()));
                other
            }
        })
        .collect()
}
