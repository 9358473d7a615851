"""distprop: synchronous data-parallel backpropagation over MPI, on NumPy or CuPy."""

from distprop import functional, heap, logconfig, nn, ops, optim
from distprop.backend import Device, device, manual_seed
from distprop.creation import (
    arange,
    empty,
    full,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    zeros,
    zeros_like,
)
from distprop.ops import (
    abs,
    amax,
    amin,
    cat,
    clamp,
    concatenate,
    exp,
    expand,
    flatten,
    log,
    log_softmax,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    permute,
    pow,
    relu,
    reshape,
    sigmoid,
    sign,
    softmax,
    sqrt,
    squeeze,
    stack,
    std,
    sum,
    tanh,
    transpose,
    unsqueeze,
    var,
    where,
)
from distprop.tensor import (
    Function,
    Tensor,
    as_tensor,
    bool_,
    enable_grad,
    float16,
    float32,
    float64,
    from_numpy,
    get_default_dtype,
    int32,
    int64,
    is_grad_enabled,
    no_grad,
    set_default_dtype,
    tensor,
)

__version__ = "0.1.0"

# Data, checkpoints (dp.save / dp.load) and the training loop; imported last (they use the above).
from distprop import amp, data, distributed, train
from distprop.train.checkpoint import load, save
from distprop.weights import load_safetensors, load_torch, save_safetensors

# glibc keeps freed memory for the next step from here on (distprop/heap.py).
heap.keep_freed_memory()
