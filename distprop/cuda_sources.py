"""The CUDA sources of the fused kernels in :mod:`distprop.cuda_kernels`, one section per family.

Only text lives here: :mod:`distprop.cuda_kernels` declares each kernel from these sources (in
``KERNELS``) and :func:`distprop.cuda_kernels.build` is the only place kernel objects are made.
Elementwise bodies use CuPy's ``T`` and the ``i`` index. ``CE_FORWARD``, ``ADAM_BODY``,
``IM2COL`` and ``COL2IM`` are ``%``-format templates (``%(T)s`` the element type, ``%(N)d`` the
block size, ``%(decode)s`` the 1-D/2-D index decoding), so a literal ``%`` in them is ``%%``.
"""

# --- optimizer updates over the flat buffer --------------------------------------------------

EFFECTIVE_GRAD = """
    T d = maximize ? (T)(-grad) : grad;
    if (weight_decay != 0.0) {
        T wd = param * (T)weight_decay;
        d = maximize ? (T)(wd - grad) : (T)(wd + grad);
    }
"""

SGD_IN = ("T grad, float64 lr, float64 momentum, float64 dampening, float64 weight_decay, "
          "int32 nesterov, int32 maximize, int32 first_step")
SGD = EFFECTIVE_GRAD + "param = param + d * (T)(-lr);"
SGD_MOMENTUM = EFFECTIVE_GRAD + """
    T b;
    if (first_step) {
        b = d;
    } else {
        b = buf * (T)momentum;
        if (dampening == 0.0) b = b + d; else b = b + d * (T)(1.0 - dampening);
    }
    buf = b;
    if (nesterov) d = b * (T)momentum + d; else d = b;
    param = param + d * (T)(-lr);
"""

ADAM_BODY = """
    T p = param;
    T d;
    if (weight_decay != 0.0 && decoupled) {
        p = p * (T)(1.0 - lr * weight_decay);
        d = maximize ? (T)(-grad) : grad;
    } else if (weight_decay != 0.0) {
        T wd = p * (T)weight_decay;
        d = maximize ? (T)(wd - grad) : (T)(wd + grad);
    } else {
        d = maximize ? (T)(-grad) : grad;
    }
    double w = 1.0 - beta1;
    T diff = d - m;
    T mm = (w < 0.5 && w > -0.5) ? (T)(m + diff * (T)w) : (T)(d - diff * (T)(1.0 - w));
    T vv = v * (T)beta2;
    T t = d * (T)(1.0 - beta2);
    t = t * d;
    vv = vv + t;
    m = mm;
    v = vv;
    %s
    T den = sqrt(src) / (T)bias_correction2_sqrt + (T)eps;
    param = p + (mm * (T)(-step_size)) / den;
"""

ADAM_IN = ("T grad, float64 lr, float64 beta1, float64 beta2, float64 eps, "
           "float64 weight_decay, float64 step_size, float64 bias_correction2_sqrt, "
           "int32 maximize, int32 decoupled")
ADAM = ADAM_BODY % "T src = vv;"
ADAM_AMSGRAD = ADAM_BODY % "vmax = (vmax > vv || vmax != vmax) ? vmax : vv;\n    T src = vmax;"

# --- softmax cross-entropy with class indices -------------------------------------------------

CE_FORWARD = r"""
extern "C" __global__ void distprop_ce_forward_%(T)s(
        const %(T)s* x, const long long* target, %(T)s* loss, %(T)s* row_max, %(T)s* row_lse,
        const long long rows, const long long classes, const long long ignore_index) {
    __shared__ %(T)s red[%(N)d];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const %(T)s* xr = x + row * classes;
    %(T)s mx = xr[0];
    for (long long j = threadIdx.x; j < classes; j += blockDim.x) mx = fmax(mx, xr[j]);
    red[threadIdx.x] = mx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = fmax(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    %(T)s acc = 0;
    for (long long j = threadIdx.x; j < classes; j += blockDim.x) acc += exp(xr[j] - mx);
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const %(T)s lse = log(red[0]);
        const long long t = target[row];
        row_max[row] = mx;
        row_lse[row] = lse;
        loss[row] = (t == ignore_index) ? (%(T)s)0 : lse - (xr[t] - mx);
    }
}
"""

CE_BACKWARD = """
    const ptrdiff_t row = i / classes;
    const long long t = target[row];
    if (t == ignore_index) {
        grad = 0;
    } else {
        const T c = coef[per_row ? row : 0];
        const T p = exp(x[i] - row_max[row] - row_lse[row]);
        grad = c * (p - ((i - row * classes) == t ? (T)1 : (T)0));
    }
"""

# --- LSTM / GRU gate math, one kernel per time step ------------------------------------------

LSTM_FORWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden, base = b * 4 * hidden + j;
    const T ai = (T)0.5 * tanh(gates[base]) + (T)0.5;
    const T af = (T)0.5 * tanh(gates[base + hidden]) + (T)0.5;
    const T ag = tanh(gates[base + 2 * hidden]);
    const T ao = (T)0.5 * tanh(gates[base + 3 * hidden]) + (T)0.5;
    gates[base] = ai;
    gates[base + hidden] = af;
    gates[base + 2 * hidden] = ag;
    gates[base + 3 * hidden] = ao;
    const T cv = af * c_prev + ai * ag;
    c = cv;
    tanh_c = tanh(cv);
    h = ao * tanh_c;
"""

LSTM_BACKWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden, base = b * 4 * hidden + j;
    const T ai = act[base], af = act[base + hidden];
    const T ag = act[base + 2 * hidden], ao = act[base + 3 * hidden];
    const T d_o = dh * tanh_c;
    T dcv = dc + (((T)1 - tanh_c * tanh_c) * ao) * dh;
    dgates[base] = (dcv * ag) * (((T)1 - ai) * ai);
    dgates[base + hidden] = (dcv * c_prev) * (((T)1 - af) * af);
    dgates[base + 2 * hidden] = (dcv * ai) * (((T)1 - ag) * (ag + (T)1));
    dgates[base + 3 * hidden] = d_o * (((T)1 - ao) * ao);
    dc = dcv * af;
"""

GRU_FORWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden;
    const ptrdiff_t base = b * 3 * hidden + j;
    const T r = (T)0.5 * tanh(gates[base] + rec[base]) + (T)0.5;
    const T z = (T)0.5 * tanh(gates[base + hidden] + rec[base + hidden]) + (T)0.5;
    const T hn = rec[base + 2 * hidden];
    const T n = tanh(gates[base + 2 * hidden] + r * hn);
    gates[base] = r;
    gates[base + hidden] = z;
    gates[base + 2 * hidden] = n;
    hidden_n = hn;
    h = (h_prev - n) * z + n;
"""

GRU_BACKWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden;
    const ptrdiff_t base = b * 3 * hidden + j;
    const T r = act[base], z = act[base + hidden], n = act[base + 2 * hidden];
    const T g = dh;
    T dz = g * (h_prev - n);
    T dn = g * ((T)1 - z);
    dn = dn * ((T)1 - n * n);
    const T dr = (dn * hidden_n) * (((T)1 - r) * r);
    dz = dz * (((T)1 - z) * z);
    dx[base] = dr;
    dx[base + hidden] = dz;
    dx[base + 2 * hidden] = dn;
    dhh[base] = dr;
    dhh[base + hidden] = dz;
    dhh[base + 2 * hidden] = dn * r;
    dh = g * z;
"""

# --- convolution: im2col / col2im --------------------------------------------------------------

IM2COL = """
    // buf is (M, G, KA) when rows, else (G, KA, M); M = N * prod(out), KA = prod(kernel) * CG
    // (+ 1 for the fused bias column, which gets ones).
    ptrdiff_t m, g, k;
    if (rows) {
        k = i %% ka; g = (i / ka) %% groups; m = i / (ka * groups);
    } else {
        m = i %% msize; k = (i / msize) %% ka; g = i / (msize * ka);
    }
    if (k >= kk) {
        buf = (T)1;
    } else {
        const ptrdiff_t c = k %% cg;
        const ptrdiff_t rest = k / cg;
        %(decode)s
        buf = inside ? (T)x[idx] : (T)0;
    }
"""

IM2COL_2D = """
    const ptrdiff_t kx = rest % kw, ky = rest / kw;
    const ptrdiff_t ox = m % ow, oy = (m / ow) % oh, n = m / (ow * oh);
    const ptrdiff_t iy = oy * sh - ph + ky * dh, ix = ox * sw - pw + kx * dw;
    const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
    const ptrdiff_t idx[4] = {n, g * cg + c, inside ? iy : 0, inside ? ix : 0};
"""

IM2COL_1D = """
    const ptrdiff_t kx = rest;
    const ptrdiff_t ox = m % ow, n = m / ow;
    const ptrdiff_t ix = ox * sw - pw + kx * dw;
    const bool inside = ix >= 0 && ix < width;
    const ptrdiff_t idx[3] = {n, g * cg + c, inside ? ix : 0};
"""

CONV_PARAMS = ("int64 groups, int64 cg, int64 kk, int64 ka, int64 msize, int32 rows, "
               "int64 height, int64 width, int64 oh, int64 ow, int64 kh, int64 kw, "
               "int64 sh, int64 sw, int64 ph, int64 pw, int64 dh, int64 dw")

COL2IM = """
    // gx is a C-contiguous (N, C, *spatial) array; gbuf the column-gradient buffer, laid out
    // (M, G, KK) when rows, else (G, KK, M).
    %(decode)s
    const ptrdiff_t g = ch / cg, c = ch - g * cg;
    T acc = 0;
    for (ptrdiff_t ky = 0; ky < kh; ++ky) {
        const ptrdiff_t ty = iy + ph - ky * dh;
        if (ty < 0 || ty %% sh != 0 || ty / sh >= oh) continue;
        const ptrdiff_t oy = ty / sh;
        for (ptrdiff_t kx = 0; kx < kw; ++kx) {
            const ptrdiff_t tx = ix + pw - kx * dw;
            if (tx < 0 || tx %% sw != 0 || tx / sw >= ow) continue;
            const ptrdiff_t ox = tx / sw;
            const ptrdiff_t m = (n * oh + oy) * ow + ox;
            const ptrdiff_t k = (ky * kw + kx) * cg + c;
            acc += rows ? gbuf[(m * groups + g) * kk + k] : gbuf[(g * kk + k) * msize + m];
        }
    }
    gx = acc;
"""

COL2IM_2D = """
    const ptrdiff_t ix = i % width, iy = (i / width) % height;
    const ptrdiff_t ch = (i / (width * height)) % (cg * groups);
    const ptrdiff_t n = i / (width * height * cg * groups);
"""

COL2IM_1D = """
    const ptrdiff_t ix = i % width, iy = 0;
    const ptrdiff_t ch = (i / width) % (cg * groups);
    const ptrdiff_t n = i / (width * cg * groups);
"""
