"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from distprop.optim import functional as F
from distprop.optim.optimizer import Optimizer, _check_nonneg, _number


class SGD(Optimizer):
    """Stochastic gradient descent (optionally with momentum), as ``torch.optim.SGD``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum factor (0 disables the momentum buffer).
        dampening: dampening of the gradient added to the momentum buffer.
        weight_decay: coupled L2 penalty (``weight_decay * param`` added to the gradient).
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for PyTorch compatibility and ignored (the update always
            runs fused over the flat buffer); likewise ``fused`` where PyTorch has it.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize}
        super().__init__(params, defaults)

    def check_group(self, group):
        _check_nonneg(group, "lr", "learning rate")
        _check_nonneg(group, "momentum", "momentum value")
        _check_nonneg(group, "weight_decay", "weight_decay value")
        _number(group, "dampening", "dampening value")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening (got momentum="
                f"{group['momentum']}, dampening={group['dampening']})"
            )

    def array_state(self, group):
        return {"momentum_buffer": 0.0} if group["momentum"] != 0 else {}

    def advance(self, group, scalars, first):
        return {}, {"first_step": first}

    def kernel(self, group, param, grad, arrays, args, scratch):
        F.sgd(param, grad, arrays.get("momentum_buffer"), lr=float(group["lr"]),
              momentum=float(group["momentum"]), dampening=float(group["dampening"]),
              weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
              maximize=bool(group["maximize"]), first_step=args["first_step"], scratch=scratch)
