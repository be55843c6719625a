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
        /// LAMB: Adam's bias-corrected direction plus decoupled decay, `r`, scaled per
        /// tensor by the trust ratio `||p|| / ||r||` (1 where either norm is 0).
        Lamb = "lamb",
        /// AdaGrad-Norm: one step size per tensor, `b2 += ||g||^2` (`g += wd p`, L2),
        /// `p -= lr g / (sqrt(b2) + eps)`.
        AdaGradNorm = "adagrad_norm",
    }
}

impl Rule {
    /// Every rule, in declaration order.
    pub const ALL: [Rule; 6] = [
        Rule::AdamW,
        Rule::Adan,
        Rule::AdaBelief,
        Rule::AdaGrad,
        Rule::Lamb,
        Rule::AdaGradNorm,
    ];

    /// The state tensors, by their formula names, in storage order: the per-element
    /// ones (the parameter's shape), then [`Rule::scalar_states`] per-tensor scalars.
    pub fn state_names(self) -> &'static [&'static str] {
        match self {
            Rule::AdamW | Rule::Lamb => &["m", "v"],
            Rule::Adan => &["m", "d", "n", "grad_prev"],
            Rule::AdaBelief => &["m", "s"],
            Rule::AdaGrad => &["v"],
            Rule::AdaGradNorm => &["b2"],
        }
    }

    /// How many of the last [`Rule::state_names`] are one scalar per tensor (shape `[1]`).
    pub fn scalar_states(self) -> usize {
        match self {
            Rule::AdaGradNorm => 1,
            _ => 0,
        }
    }

    /// How many of [`Rule::state_names`] have the parameter's shape.
    pub fn element_states(self) -> usize {
        self.state_names().len() - self.scalar_states()
    }

    /// Whether the update needs per-tensor norms first (a reducing pass, then the
    /// update: three launches per group of tensors instead of one).
    pub fn needs_norms(self) -> bool {
        matches!(self, Rule::Lamb | Rule::AdaGradNorm)
    }

    /// The length of state `j` for a tensor of `n` elements.
    pub fn state_len(self, j: usize, n: usize) -> usize {
        if j < self.element_states() {
            n
        } else {
            1
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
    /// 1e-3, betas 0.9/0.999, eps 1e-16, wd 0; AdaGrad (PyTorch) and AdaGrad-Norm lr
    /// 1e-2, eps 1e-10, wd 0; LAMB (NVIDIA apex's FusedLAMB) lr 1e-3, betas 0.9/0.999,
    /// eps 1e-6, wd 1e-2.
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
            Rule::AdaGrad | Rule::AdaGradNorm => Hyper {
                lr: 1e-2,
                eps: 1e-10,
                ..base
            },
            Rule::Lamb => Hyper {
                eps: 1e-6,
                weight_decay: 1e-2,
                ..base
            },
        }
    }

    /// Errors name the first parameter out of range.
    pub fn check(&self, rule: Rule) -> Result<()> {
        let bad = |param: &str, expected: &str, v: f64| Error::Param {
            param: param.into(),
            expected: expected.into(),
            found: kiln_runtime::number_str(v),
        };
        // The kernels compute in f32: each value must stay finite there, and `eps` a
        // normal f32 (a subnormal one may be flushed to 0 on a GPU: 0/0 at a zero gradient).
        let f32_finite = |v: f64| (v as f32).is_finite();
        if !(self.lr.is_finite() && self.lr >= 0.0 && f32_finite(self.lr)) {
            return Err(bad("lr", "a finite number >= 0 (finite in f32)", self.lr));
        }
        let betas: &[(&str, f64)] = match rule {
            Rule::AdaGrad | Rule::AdaGradNorm => &[],
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
        if !(self.eps.is_finite()
            && self.eps >= f64::from(f32::MIN_POSITIVE)
            && f32_finite(self.eps))
        {
            return Err(bad(
                "eps",
                "a number > 0, a normal f32 (1.2e-38 ..= 3.4e38)",
                self.eps,
            ));
        }
        if !(self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && f32_finite(self.weight_decay))
        {
            return Err(bad(
                "weight_decay",
                "a finite number >= 0 (finite in f32)",
                self.weight_decay,
            ));
        }
        // The decay multiplies by `1 - lr weight_decay` (AdaGrad: adds `weight_decay
        // param` to the gradient): the product must stay finite in f32 too.
        if !f32_finite(self.lr * self.weight_decay) {
            return Err(Error::Param {
                param: "lr, weight_decay".into(),
                expected: "lr x weight_decay finite in f32 (< 3.4e38)".into(),
                found: format!(
                    "{} x {}",
                    kiln_runtime::number_str(self.lr),
                    kiln_runtime::number_str(self.weight_decay)
                ),
            });
        }
        Ok(())
    }
}
