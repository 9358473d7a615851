"""Per-coordinate adaptive learning rates: Adagrad, RMSprop and Adadelta."""

from __future__ import annotations

from distprop.optim import functional as F
from distprop.optim.optimizer import Optimizer, _check_nonneg, _check_unit


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.), as ``torch.optim.Adagrad``; state is created at construction.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        lr_decay: the step-``t`` learning rate is ``lr / (1 + (t - 1) * lr_decay)``.
        weight_decay: coupled L2 penalty.
        initial_accumulator_value: starting value of the sum of squared gradients.
        eps: added to the denominator for numerical stability.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for PyTorch compatibility and ignored (the update always
            runs fused over the flat buffer); likewise ``fused`` where PyTorch has it.
    """

    eager_state = True

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):
        defaults = {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value,
                    "maximize": maximize}
        super().__init__(params, defaults)

    def check_group(self, group):
        _check_nonneg(group, "lr", "learning rate")
        _check_nonneg(group, "lr_decay", "lr_decay value")
        _check_nonneg(group, "weight_decay", "weight_decay value")
        _check_nonneg(group, "initial_accumulator_value", "initial_accumulator_value value")
        _check_nonneg(group, "eps", "epsilon value")

    def array_state(self, group):
        return {"sum": float(group["initial_accumulator_value"])}

    def scalar_state(self, group):
        return {"step": 0.0}

    def advance(self, group, scalars, first):
        step = scalars["step"] + 1.0
        return {"step": step}, {"step": step}

    def kernel(self, group, param, grad, arrays, args, scratch):
        F.adagrad(param, grad, arrays["sum"], step=args["step"], lr=float(group["lr"]),
                  lr_decay=float(group["lr_decay"]), weight_decay=float(group["weight_decay"]),
                  eps=float(group["eps"]), maximize=bool(group["maximize"]), scratch=scratch)


class RMSprop(Optimizer):
    """RMSprop (Hinton), optionally centered and with momentum, as ``torch.optim.RMSprop``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        alpha: smoothing constant of the squared-gradient average.
        eps: added to the denominator for numerical stability.
        weight_decay: coupled L2 penalty.
        momentum: momentum factor.
        centered: normalize by the gradient's estimated variance instead of its second moment.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for PyTorch compatibility and ignored (the update always
            runs fused over the flat buffer); likewise ``fused`` where PyTorch has it.
    """

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None):
        defaults = {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps,
                    "centered": centered, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    def check_group(self, group):
        _check_nonneg(group, "lr", "learning rate")
        _check_nonneg(group, "eps", "epsilon value")
        _check_nonneg(group, "momentum", "momentum value")
        _check_nonneg(group, "weight_decay", "weight_decay value")
        _check_nonneg(group, "alpha", "alpha value")

    def array_state(self, group):
        names = {"square_avg": 0.0}
        if group["momentum"] > 0:
            names["momentum_buffer"] = 0.0
        if group["centered"]:
            names["grad_avg"] = 0.0
        return names

    def scalar_state(self, group):
        return {"step": 0.0}

    def advance(self, group, scalars, first):
        step = scalars["step"] + 1.0
        return {"step": step}, {}

    def kernel(self, group, param, grad, arrays, args, scratch):
        F.rmsprop(param, grad, arrays["square_avg"], arrays.get("momentum_buffer"),
                  arrays.get("grad_avg"), lr=float(group["lr"]), alpha=float(group["alpha"]),
                  eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                  momentum=float(group["momentum"]), centered=bool(group["centered"]),
                  maximize=bool(group["maximize"]), scratch=scratch)


class Adadelta(Optimizer):
    """Adadelta (Zeiler), as ``torch.optim.Adadelta``.

    Args:
        params: parameters or parameter groups.
        lr: coefficient that scales delta before it is applied.
        rho: decay rate of the running averages, in [0, 1].
        eps: added inside the square roots for numerical stability.
        weight_decay: coupled L2 penalty.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for PyTorch compatibility and ignored (the update always
            runs fused over the flat buffer); likewise ``fused`` where PyTorch has it.
    """

    def __init__(self, params, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 foreach: bool | None = None):
        defaults = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize}
        super().__init__(params, defaults)

    def check_group(self, group):
        _check_nonneg(group, "lr", "learning rate")
        _check_unit(group, "rho", "rho value", closed=True)
        _check_nonneg(group, "eps", "epsilon value")
        _check_nonneg(group, "weight_decay", "weight_decay value")

    def array_state(self, group):
        return {"square_avg": 0.0, "acc_delta": 0.0}

    def scalar_state(self, group):
        return {"step": 0.0}

    def advance(self, group, scalars, first):
        step = scalars["step"] + 1.0
        return {"step": step}, {}

    def kernel(self, group, param, grad, arrays, args, scratch):
        F.adadelta(param, grad, arrays["square_avg"], arrays["acc_delta"],
                   lr=float(group["lr"]), rho=float(group["rho"]), eps=float(group["eps"]),
                   weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
                   scratch=scratch)
