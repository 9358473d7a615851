"""Adam, AdamW and NAdam."""

from __future__ import annotations

from distprop.optim import functional as F
from distprop.optim.layout import scalar_dtype
from distprop.optim.optimizer import (
    Optimizer,
    _check_betas,
    _check_nonneg,
)


def _check_adam_group(group) -> None:
    _check_nonneg(group, "lr", "learning rate")
    _check_nonneg(group, "eps", "epsilon value")
    _check_betas(group)
    _check_nonneg(group, "weight_decay", "weight_decay value")


class Adam(Optimizer):
    """Adam (Kingma & Ba), optionally AMSGrad, as ``torch.optim.Adam``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: decay rates of the first and second moment averages, each in [0, 1).
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient (or applied to the parameters directly
            with ``decoupled_weight_decay=True``, which is AdamW).
        amsgrad: use the running maximum of the second moment (AMSGrad).
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for PyTorch compatibility and ignored (the update always
            runs fused over the flat buffer); likewise ``fused`` where PyTorch has it.
        decoupled_weight_decay: decay the parameters as AdamW does.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad, "maximize": maximize,
                    "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    def check_group(self, group):
        _check_adam_group(group)

    def array_state(self, group):
        names = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if group["amsgrad"]:
            names["max_exp_avg_sq"] = 0.0
        return names

    def scalar_state(self, group):
        return {"step": 0.0}

    def advance(self, group, scalars, first):
        step = scalars["step"] + 1.0
        return {"step": step}, {"step": step}

    def kernel(self, group, param, grad, arrays, args, scratch):
        beta1, beta2 = group["betas"]
        F.adam(param, grad, arrays["exp_avg"], arrays["exp_avg_sq"],
               arrays.get("max_exp_avg_sq"), step=args["step"], lr=float(group["lr"]),
               beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
               weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
               maximize=bool(group["maximize"]),
               decoupled_weight_decay=bool(group["decoupled_weight_decay"]), scratch=scratch)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    Each step first scales the parameters by ``1 - lr * weight_decay``; the decay never enters
    the moment estimates. Arguments as :class:`Adam`, with ``weight_decay=1e-2`` by default.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)


class NAdam(Optimizer):
    """Adam with Nesterov momentum (Dozat), as ``torch.optim.NAdam``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: decay rates of the moment averages, each in [0, 1).
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty (decoupled as in AdamW with ``decoupled_weight_decay``).
        momentum_decay: the ``psi`` of the momentum schedule
            ``mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * psi))``.
        decoupled_weight_decay: decay the parameters directly instead of the gradient.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for PyTorch compatibility and ignored (the update always
            runs fused over the flat buffer); likewise ``fused`` where PyTorch has it.
    """

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "momentum_decay": momentum_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    def check_group(self, group):
        _check_adam_group(group)
        _check_nonneg(group, "momentum_decay", "momentum_decay value")

    def array_state(self, group):
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def scalar_state(self, group):
        return {"step": 0.0, "mu_product": 1.0}

    def advance(self, group, scalars, first):
        step = scalars["step"] + 1.0
        mu, mu_next = F.nadam_scalars(step, float(group["betas"][0]),
                                      float(group["momentum_decay"]))
        # PyTorch keeps mu_product as a float32 (default scalar dtype) tensor: round likewise.
        dtype = scalar_dtype()
        mu_product = float(dtype(dtype(scalars["mu_product"]) * dtype(mu)))
        return ({"step": step, "mu_product": mu_product},
                {"step": step, "mu": mu, "mu_next": mu_next, "mu_product": mu_product})

    def kernel(self, group, param, grad, arrays, args, scratch):
        beta1, beta2 = group["betas"]
        F.nadam(param, grad, arrays["exp_avg"], arrays["exp_avg_sq"], step=args["step"],
                mu=args["mu"], mu_next=args["mu_next"], mu_product=args["mu_product"],
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                maximize=bool(group["maximize"]), scratch=scratch)

