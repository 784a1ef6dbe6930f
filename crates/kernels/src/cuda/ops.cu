// Element-wise, normalisation, embedding, loss and optimizer kernels of the CUDA backend.
// Compiled by NVRTC at first use (see device.rs). Every kernel mirrors the CPU kernel of the
// same name in `kernels::ops`, in the same evaluation order where that order is observable;
// reductions run in a fixed tree order so that results are reproducible run to run.

typedef unsigned short bf16_t;
typedef long long i64;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define NT 256

__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                           // nearest even
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float bf2f(bf16_t b) { return __uint_as_float(((unsigned)b) << 16); }

__device__ __forceinline__ i64 gid() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 gstride() { return (i64)gridDim.x * blockDim.x; }

// Four values per thread: one 16-byte load, one 8-byte store (buffers are allocation-aligned);
// the last n % 4 values one by one.
extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, i64 n) {
    i64 quads = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    uint2* y4 = reinterpret_cast<uint2*>(y);
    for (i64 i = gid(); i < quads; i += gstride()) {
        float4 v = x4[i];
        uint2 o;
        o.x = (unsigned)f2bf(v.x) | ((unsigned)f2bf(v.y) << 16);
        o.y = (unsigned)f2bf(v.z) | ((unsigned)f2bf(v.w) << 16);
        y4[i] = o;
    }
    for (i64 i = quads * 4 + gid(); i < n; i += gstride()) y[i] = f2bf(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) y[i] = bf2f(x[i]);
}
extern "C" __global__ void round_bf16(float* x, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) x[i] = bf2f(f2bf(x[i]));
}
extern "C" __global__ void add(const float* a, const float* b, float* out, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) out[i] = a[i] + b[i];
}
extern "C" __global__ void axpy(float alpha, const float* x, float* y, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) y[i] += alpha * x[i];
}
extern "C" __global__ void scale(float alpha, float* x, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) x[i] *= alpha;
}

// Block sums of squares in f64; the host adds the per-block partials in order.
extern "C" __global__ void sum_squares(const float* x, double* partial, i64 n) {
    __shared__ double red[NT];
    double acc = 0.0;
    for (i64 i = gid(); i < n; i += gstride()) { double v = x[i]; acc += v * v; }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

extern "C" __global__ void embedding_forward(const float* w, i64 rows, i64 dim, i64 vocab_start,
                                             const unsigned* ids, i64 n, float* out) {
    for (i64 i = gid(); i < n * dim; i += gstride()) {
        i64 t = i / dim, j = i % dim;
        i64 id = (i64)ids[t];
        out[i] = (id >= vocab_start && id < vocab_start + rows) ? w[(id - vocab_start) * dim + j] : 0.0f;
    }
}

// One block per distinct row: tokens of the row are listed in `order[starts[u] .. starts[u+1]]`
// (ascending token index), so the sum runs in the CPU's order and needs no atomics.
extern "C" __global__ void embedding_backward(const float* grad_out, i64 dim, const int* rows_of,
                                              const int* starts, const int* order, float* grad_w) {
    int u = blockIdx.x;
    i64 row = rows_of[u];
    for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
        float acc = grad_w[row * dim + j];
        for (int p = starts[u]; p < starts[u + 1]; p++) acc += grad_out[(i64)order[p] * dim + j];
        grad_w[row * dim + j] = acc;
    }
}

__device__ float block_sum(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}
__device__ float block_max(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    float r = red[0];
    __syncthreads();
    return r;
}

// One block (NT threads) per row.
extern "C" __global__ void rms_norm_forward(const float* x, const float* w, i64 dim, float eps,
                                           float* y, float* rstd) {
    __shared__ float red[NT];
    i64 r = blockIdx.x;
    const float* xr = x + r * dim;
    float acc = 0.0f;
    for (i64 j = threadIdx.x; j < dim; j += NT) acc += xr[j] * xr[j];
    float ms = block_sum(acc, red) / (float)dim;
    float s = 1.0f / sqrtf(ms + eps);
    if (threadIdx.x == 0) rstd[r] = s;
    for (i64 j = threadIdx.x; j < dim; j += NT) y[r * dim + j] = w[j] * (xr[j] * s);
}

// dx per row (one block per row).
extern "C" __global__ void rms_norm_backward_dx(const float* dy, const float* x, const float* w,
                                               const float* rstd, i64 dim, float* dx) {
    __shared__ float red[NT];
    i64 r = blockIdx.x;
    float s = rstd[r];
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    float acc = 0.0f;
    for (i64 j = threadIdx.x; j < dim; j += NT) acc += dyr[j] * w[j] * (xr[j] * s);
    float dot = block_sum(acc, red) / (float)dim;
    for (i64 j = threadIdx.x; j < dim; j += NT) dx[r * dim + j] = s * (dyr[j] * w[j] - xr[j] * s * dot);
}

// dweight partials: block (cx, cy) sums rows cy*chunk .. (cy+1)*chunk for its columns.
extern "C" __global__ void rms_norm_backward_dw_partial(const float* dy, const float* x,
                                                       const float* rstd, i64 rows, i64 dim,
                                                       i64 chunk, float* partial) {
    i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    i64 r0 = (i64)blockIdx.y * chunk;
    i64 r1 = min(rows, r0 + chunk);
    float acc = 0.0f;
    for (i64 r = r0; r < r1; r++) acc += dy[r * dim + j] * (x[r * dim + j] * rstd[r]);
    partial[(i64)blockIdx.y * dim + j] = acc;
}
extern "C" __global__ void rms_norm_backward_dw_reduce(const float* partial, i64 chunks, i64 dim,
                                                      float* dw) {
    i64 j = gid();
    if (j >= dim) return;
    float acc = 0.0f;
    for (i64 c = 0; c < chunks; c++) acc += partial[c * dim + j];
    dw[j] += acc;
}

extern "C" __global__ void rope(float* x, const unsigned* positions, const float* inv_freq,
                                i64 tokens, i64 heads, i64 head_dim, float sign) {
    i64 half = head_dim / 2;
    for (i64 i = gid(); i < tokens * heads * half; i += gstride()) {
        i64 j = i % half, th = i / half, t = th / heads;
        float angle = (float)positions[t] * inv_freq[j];
        float c = cosf(angle), s = sign * sinf(angle);
        float* v = x + th * head_dim;
        float a = v[j], b = v[j + half];
        v[j] = a * c - b * s;
        v[j + half] = b * c + a * s;
    }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

extern "C" __global__ void swiglu_forward(const float* gate, const float* up, float* out, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) { float g = gate[i]; out[i] = g * sigmoidf(g) * up[i]; }
}
extern "C" __global__ void swiglu_backward(const float* dout, const float* gate, const float* up,
                                          float* dgate, float* dup, i64 n) {
    for (i64 i = gid(); i < n; i += gstride()) {
        float g = gate[i], s = sigmoidf(g);
        dup[i] = dout[i] * g * s;
        dgate[i] = dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
    }
}

// One block per row: lse, and the row's loss (0 for unmasked rows) for the host to add in order.
extern "C" __global__ void cross_entropy_forward(const float* logits, i64 vocab, const unsigned* targets,
                                                const unsigned char* mask, float* lse, float* loss) {
    __shared__ float red[NT];
    i64 r = blockIdx.x;
    const float* row = logits + r * vocab;
    float mx = -INFINITY;
    for (i64 j = threadIdx.x; j < vocab; j += NT) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, red);
    float acc = 0.0f;
    for (i64 j = threadIdx.x; j < vocab; j += NT) acc += expf(row[j] - mx);
    float sum = block_sum(acc, red);
    if (threadIdx.x == 0) {
        float l = mx + logf(sum);
        lse[r] = l;
        loss[r] = mask[r] ? l - row[targets[r]] : 0.0f;
    }
}
extern "C" __global__ void cross_entropy_backward(const float* logits, i64 vocab, const unsigned* targets,
                                                 const unsigned char* mask, const float* lse, float scale,
                                                 float* dlogits) {
    i64 r = blockIdx.x;
    for (i64 j = threadIdx.x; j < vocab; j += NT) {
        float d = 0.0f;
        if (mask[r]) {
            d = scale * expf(logits[r * vocab + j] - lse[r]);
            if (j == (i64)targets[r]) d -= scale;
        }
        dlogits[r * vocab + j] = d;
    }
}

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, i64 n, float decay,
                                 float b1, float b2, float one_minus_b1, float one_minus_b2,
                                 float step_size, float eps, float bc2_sqrt) {
    for (i64 i = gid(); i < n; i += gstride()) {
        float gi = g[i];
        float pi = p[i] * decay;
        float mi = b1 * m[i] + one_minus_b1 * gi;
        float vi = b2 * v[i] + one_minus_b2 * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi - step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}
