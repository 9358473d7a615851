"""A user's optimizer written only against the public hooks of ``dp.optim.Optimizer``
(imported by tests/test_extension_hooks.py and by the MPI script it runs)."""

import distprop as dp
from distprop.backend import get_array_module


class SignMomentum(dp.optim.Optimizer):
    """buf = beta * buf + grad; param -= lr * sign(buf) / sqrt(step)."""

    def __init__(self, params, lr=0.01, beta=0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    def check_group(self, group):
        super().check_group(group)
        if not 0 <= group["beta"] < 1:
            raise ValueError(f"Invalid beta: {group['beta']}")

    def array_state(self, group):
        return {"buf": 0.0}

    def scalar_state(self, group):
        return {"step": 0}

    def advance(self, group, scalars, first):
        step = scalars["step"] + 1
        return {"step": step}, {"scale": group["lr"] / step ** 0.5}

    def kernel(self, group, param, grad, arrays, args, scratch):
        xp = get_array_module(param)
        buf = arrays["buf"]
        buf *= group["beta"]
        buf += grad
        param -= args["scale"] * xp.sign(buf)
