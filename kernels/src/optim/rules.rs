//! The update rules and their hyper-parameters (`docs/optim.md`; PyTorch's
//! defaults where PyTorch has the optimizer, the paper's code otherwise).

use kiln_runtime::{Error, Result};

kiln_runtime::comptime_enum! {
    /// The update rule of the fused step kernel (a `#[comptime]` specialisation).
    pub enum Rule {
        /// PyTorch's AdamW: decoupled decay `p *= 1 - lr wd`, then the bias-corrected
        /// Adam step.
        AdamW = "adamw",
        /// Adan (sail-sg): Nesterov momentum of the gradient difference; proximal decay
        /// `p /= 1 + lr wd` (or `p *= 1 - lr wd` first with `no_prox`).
        Adan = "adan",
        /// AdaBelief: the second moment of `g - m` (plus eps), decoupled decay.
        AdaBelief = "adabelief",
        /// PyTorch's Adagrad: `g += wd p` (L2), `v += g^2`, `p -= lr g / (sqrt(v) + eps)`.
        AdaGrad = "adagrad",
    }
}

impl Rule {
    /// The per-element state tensors, by their formula names, in storage order.
    pub fn state_names(self) -> &'static [&'static str] {
        match self {
            Rule::AdamW => &["m", "v"],
            Rule::Adan => &["m", "d", "n", "grad_prev"],
            Rule::AdaBelief => &["m", "s"],
            Rule::AdaGrad => &["v"],
        }
    }
}

/// Hyper-parameters of a rule (unused ones are ignored).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay (Adan: of the gradient difference).
    pub beta2: f64,
    /// Adan: decay of the squared Nesterov gradient.
    pub beta3: f64,
    /// Denominator floor.
    pub eps: f64,
    /// Weight decay (decoupled, except AdaGrad's L2 term).
    pub weight_decay: f64,
    /// Adan: decay before the step (`p *= 1 - lr wd`) instead of the proximal division.
    pub no_prox: bool,
}

impl Hyper {
    /// The defaults of `rule`: AdamW (PyTorch) lr 1e-3, betas 0.9/0.999, eps 1e-8, wd
    /// 1e-2; Adan (sail-sg) lr 1e-3, betas 0.98/0.92/0.99, eps 1e-8, wd 0; AdaBelief lr
    /// 1e-3, betas 0.9/0.999, eps 1e-16, wd 0; AdaGrad (PyTorch) lr 1e-2, eps 1e-10, wd 0.
    pub fn defaults(rule: Rule) -> Self {
        let base = Hyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.0,
            eps: 1e-8,
            weight_decay: 0.0,
            no_prox: false,
        };
        match rule {
            Rule::AdamW => Hyper {
                weight_decay: 1e-2,
                ..base
            },
            Rule::Adan => Hyper {
                beta1: 0.98,
                beta2: 0.92,
                beta3: 0.99,
                ..base
            },
            Rule::AdaBelief => Hyper { eps: 1e-16, ..base },
            Rule::AdaGrad => Hyper {
                lr: 1e-2,
                eps: 1e-10,
                ..base
            },
        }
    }

    /// Errors name the first parameter out of range.
    pub fn check(&self, rule: Rule) -> Result<()> {
        let bad = |param: &str, expected: &str, v: f64| Error::Param {
            param: param.into(),
            expected: expected.into(),
            found: v.to_string(),
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(bad("lr", "a finite number >= 0", self.lr));
        }
        let betas: &[(&str, f64)] = match rule {
            Rule::AdaGrad => &[],
            Rule::Adan => &[
                ("beta1", self.beta1),
                ("beta2", self.beta2),
                ("beta3", self.beta3),
            ],
            _ => &[("beta1", self.beta1), ("beta2", self.beta2)],
        };
        for &(n, b) in betas {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(n, "0 <= beta < 1", b));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(bad("eps", "a finite number > 0", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(
                "weight_decay",
                "a finite number >= 0",
                self.weight_decay,
            ));
        }
        Ok(())
    }
}
