"""Optimizer update rules as small in-place functions over arrays (optax style).

Each function applies one step of one optimizer to a parameter array and its state arrays, in
place, with PyTorch's formulas (its single-tensor implementation, ``foreach=False``). They are
elementwise, so the same function serves one parameter, a whole flat buffer, or any slice or chunk
of it, with identical numerics. Scalars are Python floats, so float32 arrays stay float32.

Every function takes ``scratch``: up to three work arrays shaped like ``param`` (or None to
allocate them); the gradient is never modified.
"""

from __future__ import annotations

from distprop import cuda_kernels
from distprop.backend import get_array_module


def _scratch(scratch, count: int, like) -> list:
    if scratch is not None:
        return scratch
    xp = get_array_module(like)
    return [xp.empty_like(like) for _ in range(count)]


def effective_grad(xp, param, grad, weight_decay: float, maximize: bool, out):
    """``-grad`` when maximizing, plus ``weight_decay * param`` (coupled L2); may return grad."""
    if weight_decay != 0:
        xp.multiply(param, weight_decay, out=out)
        if maximize:
            xp.subtract(out, grad, out=out)
        else:
            xp.add(out, grad, out=out)
        return out
    if maximize:
        return xp.negative(grad, out=out)
    return grad


def lerp_(xp, start, end, weight: float, tmp) -> None:
    """``start += weight * (end - start)``, evaluated as torch.lerp does for either half."""
    xp.subtract(end, start, out=tmp)
    if abs(weight) < 0.5:
        tmp *= weight
        start += tmp
    else:
        tmp *= 1.0 - weight
        xp.subtract(end, tmp, out=start)


def addcmul_(xp, target, a, b, value: float, tmp) -> None:
    """``target += value * a * b``."""
    xp.multiply(a, value, out=tmp)
    tmp *= b
    target += tmp


def sgd(param, grad, momentum_buffer, *, lr: float, momentum: float = 0.0,
        dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        maximize: bool = False, first_step: bool = False, scratch=None) -> None:
    """SGD: ``b = momentum * b + (1 - dampening) * g`` (``b = g`` at first), ``p -= lr * b``
    (``g + momentum * b`` with Nesterov)."""
    if cuda_kernels.sgd(param, grad, momentum_buffer, lr=lr, momentum=momentum,
                        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, first_step=first_step) is not None:
        return  # one fused kernel on the GPU (same formula, same order)
    xp = get_array_module(param)
    s = _scratch(scratch, 2, param)
    d = effective_grad(xp, param, grad, weight_decay, maximize, s[0])
    if momentum != 0:
        buf = momentum_buffer
        if first_step:
            xp.copyto(buf, d)
        else:
            buf *= momentum
            if dampening == 0:
                buf += d
            else:
                xp.multiply(d, 1.0 - dampening, out=s[1])
                buf += s[1]
        if nesterov:
            xp.multiply(buf, momentum, out=s[1])
            s[1] += d
            d = s[1]
        else:
            d = buf
    xp.multiply(d, -lr, out=s[1])
    param += s[1]


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step: float, lr: float,
         beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
         decoupled_weight_decay: bool = False, scratch=None) -> None:
    """Adam / AdamW: ``m = lerp(m, g, 1-b1)``, ``v = b2 v + (1-b2) g^2``,
    ``p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`` (``v`` -> running max with
    amsgrad; AdamW first scales ``p *= 1 - lr * weight_decay``)."""
    if cuda_kernels.adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr,
                         beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay) is not None:
        return  # one fused kernel on the GPU (same formula, same order)
    xp = get_array_module(param)
    s = _scratch(scratch, 2, param)
    if weight_decay != 0 and decoupled_weight_decay:
        param *= 1.0 - lr * weight_decay
        d = effective_grad(xp, param, grad, 0.0, maximize, s[0])
    else:
        d = effective_grad(xp, param, grad, weight_decay, maximize, s[0])
    t = s[1]
    lerp_(xp, exp_avg, d, 1.0 - beta1, t)
    exp_avg_sq *= beta2
    addcmul_(xp, exp_avg_sq, d, d, 1.0 - beta2, t)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    if amsgrad:
        xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        xp.sqrt(max_exp_avg_sq, out=t)
    else:
        xp.sqrt(exp_avg_sq, out=t)
    t /= bias_correction2_sqrt
    t += eps
    # param.addcdiv_(exp_avg, denom, value=-step_size); s[0] is free once the moments are done.
    xp.multiply(exp_avg, -step_size, out=s[0])
    xp.divide(s[0], t, out=t)
    param += t


def nadam_scalars(step: float, beta1: float, momentum_decay: float) -> tuple[float, float]:
    """NAdam's momentum schedule ``(mu_t, mu_{t+1})``."""
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    return mu, mu_next


def nadam(param, grad, exp_avg, exp_avg_sq, *, step: float, mu: float, mu_next: float,
          mu_product: float, lr: float, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
          maximize: bool = False, scratch=None) -> None:
    """NAdam: Adam's moments with ``p -= lr (1-mu_t)/(1-prod mu) g / denom
    + lr mu_{t+1}/(1-prod mu * mu_{t+1}) m / denom``, ``denom = sqrt(v / (1-b2^t)) + eps``.

    ``mu_product`` is the product of ``mu_1..mu_t`` (already including this step's ``mu``).
    """
    xp = get_array_module(param)
    s = _scratch(scratch, 3, param)
    if weight_decay != 0 and decoupled_weight_decay:
        param *= 1.0 - lr * weight_decay
        d = effective_grad(xp, param, grad, 0.0, maximize, s[0])
    else:
        d = effective_grad(xp, param, grad, weight_decay, maximize, s[0])
    denom, t = s[1], s[2]
    lerp_(xp, exp_avg, d, 1.0 - beta1, t)
    exp_avg_sq *= beta2
    addcmul_(xp, exp_avg_sq, d, d, 1.0 - beta2, t)
    xp.divide(exp_avg_sq, 1.0 - beta2**step, out=denom)
    xp.sqrt(denom, out=denom)
    denom += eps
    mu_product_next = mu_product * mu_next
    xp.multiply(d, -lr * (1.0 - mu) / (1.0 - mu_product), out=t)
    t /= denom
    param += t
    xp.multiply(exp_avg, (-lr * mu_next) / (1.0 - mu_product_next), out=t)
    t /= denom
    param += t


def rmsprop(param, grad, square_avg, momentum_buffer=None, grad_avg=None, *, lr: float,
            alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, maximize: bool = False,
            scratch=None) -> None:
    """RMSprop: ``v = a v + (1-a) g^2``, ``avg = sqrt(v - mean_g^2 if centered else v) + eps``,
    ``b = momentum b + g / avg; p -= lr b`` (or ``p -= lr g / avg`` without momentum)."""
    xp = get_array_module(param)
    s = _scratch(scratch, 2, param)
    d = effective_grad(xp, param, grad, weight_decay, maximize, s[0])
    avg = s[1]
    square_avg *= alpha
    addcmul_(xp, square_avg, d, d, 1.0 - alpha, avg)
    if centered:
        lerp_(xp, grad_avg, d, 1.0 - alpha, avg)
        xp.multiply(grad_avg, grad_avg, out=avg)
        xp.subtract(square_avg, avg, out=avg)
        xp.sqrt(avg, out=avg)
    else:
        xp.sqrt(square_avg, out=avg)
    avg += eps
    if momentum > 0:
        momentum_buffer *= momentum
        xp.divide(d, avg, out=avg)
        momentum_buffer += avg
        xp.multiply(momentum_buffer, -lr, out=avg)
        param += avg
    else:
        xp.multiply(d, -lr, out=s[0])
        s[0] /= avg
        param += s[0]


def adagrad(param, grad, state_sum, *, step: float, lr: float, lr_decay: float = 0.0,
            weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
            scratch=None) -> None:
    """Adagrad: ``s += g^2``, ``p -= lr / (1 + (t-1) lr_decay) * g / (sqrt(s) + eps)``."""
    xp = get_array_module(param)
    s = _scratch(scratch, 2, param)
    d = effective_grad(xp, param, grad, weight_decay, maximize, s[0])
    clr = lr / (1 + (step - 1) * lr_decay)
    std = s[1]
    xp.multiply(d, d, out=std)
    state_sum += std
    xp.sqrt(state_sum, out=std)
    std += eps
    xp.multiply(d, -clr, out=s[0])
    s[0] /= std
    param += s[0]


def adadelta(param, grad, square_avg, acc_delta, *, lr: float = 1.0, rho: float = 0.9,
             eps: float = 1e-6, weight_decay: float = 0.0, maximize: bool = False,
             scratch=None) -> None:
    """Adadelta: ``v = rho v + (1-rho) g^2``, ``delta = sqrt(u + eps) / sqrt(v + eps) * g``,
    ``u = rho u + (1-rho) delta^2``, ``p -= lr delta``."""
    xp = get_array_module(param)
    s = _scratch(scratch, 3, param)
    d = effective_grad(xp, param, grad, weight_decay, maximize, s[0])
    std, delta = s[1], s[2]
    square_avg *= rho
    addcmul_(xp, square_avg, d, d, 1.0 - rho, std)
    xp.add(square_avg, eps, out=std)
    xp.sqrt(std, out=std)
    xp.add(acc_delta, eps, out=delta)
    xp.sqrt(delta, out=delta)
    delta /= std
    delta *= d
    acc_delta *= rho
    addcmul_(xp, acc_delta, delta, delta, 1.0 - rho, std)
    xp.multiply(delta, -lr, out=delta)
    param += delta
