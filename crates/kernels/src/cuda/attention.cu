// Causal grouped-query attention over packed variable-length sequences, FlashAttention-2's
// algorithm: tiles of queries against tiles of keys with an online softmax, no T×T matrix.
// Compiled by NVRTC once per head dimension (-DHEAD_DIM=…).
//
// Layouts as the CPU kernel: q, out, dq [tokens, heads, D]; k, v, dk, dv [tokens, kv_heads, D];
// lse, delta [heads, tokens]. `tiles` lists (sequence start, sequence length, first row of the
// tile within the sequence) for every tile of every sequence.
//
// The backward is deterministic: dK/dV are accumulated by the block that owns a key tile (looping
// over the query heads of its kv group), dQ by the block that owns a query tile; no atomics.

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#define D HEAD_DIM
#define DP (D + 1)          // padded row stride of shared tiles (no bank conflicts)
#define NT 256              // threads per block
#define BQ 64               // query rows per forward / dq tile (4 threads per row)
#define BK 32               // keys per tile
#define PS (BK + 1)         // padded row stride of the probability tile
#define CPT ((D + 3) / 4)   // output columns per thread, forward / dq
#define BKV 32              // key rows per dk/dv tile (8 threads per row)
#define BQ2 32              // query rows per inner tile of the dk/dv kernel
#define CPT8 ((D + 7) / 8)  // columns per thread, dk/dv

typedef long long i64;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ void load_rows(float* dst, const float* src, int s0, int r0, int rows,
                                          int slen, int stride_heads, int head) {
    for (int i = threadIdx.x; i < rows * D; i += NT) {
        int rr = i / D, c = i % D;
        int t = r0 + rr;
        dst[rr * DP + c] = t < slen ? src[((i64)(s0 + t) * stride_heads + head) * D + c] : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(NT) attn_fwd(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse, const int* __restrict__ tiles, int tokens,
    int heads, int kv_heads, float scale) {
    extern __shared__ float smem[];
    float* sq = smem;
    float* sk = sq + BQ * DP;
    float* sv = sk + BK * DP;
    float* sp = sv + BK * DP;
    int tile = blockIdx.x, h = blockIdx.y;
    int s0 = tiles[3 * tile], slen = tiles[3 * tile + 1], q0 = tiles[3 * tile + 2];
    int g = h / (heads / kv_heads);
    int tid = threadIdx.x, r = tid >> 2, sub = tid & 3;
    int qrows = min(BQ, slen - q0);
    bool valid = r < qrows;
    int qi = q0 + r;
    load_rows(sq, q, s0, q0, BQ, slen, heads, h);
    float o[CPT];
#pragma unroll
    for (int i = 0; i < CPT; i++) o[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    int kend = q0 + qrows;  // causal: keys [0, last query]
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        load_rows(sk, k, s0, k0, BK, slen, kv_heads, g);
        load_rows(sv, v, s0, k0, BK, slen, kv_heads, g);
        __syncthreads();
        float s[8];
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            int j = sub * 8 + jj, kj = k0 + j;
            float acc = 0.0f;
#pragma unroll 16
            for (int c = 0; c < D; c++) acc += sq[r * DP + c] * sk[j * DP + c];
            acc *= scale;
            if (!valid || kj > qi) acc = -INFINITY;
            s[jj] = acc;
            mx = fmaxf(mx, acc);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float mnew = fmaxf(m, mx);
        float alpha = (m == -INFINITY) ? 0.0f : expf(m - mnew);
        float rs = 0.0f;
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            float p = (s[jj] == -INFINITY) ? 0.0f : expf(s[jj] - mnew);
            sp[r * PS + sub * 8 + jj] = p;
            rs += p;
        }
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);
        rs += __shfl_xor_sync(0xffffffffu, rs, 2);
        l = l * alpha + rs;
        m = mnew;
#pragma unroll
        for (int i = 0; i < CPT; i++) o[i] *= alpha;
        __syncwarp();
        for (int j = 0; j < BK; j++) {
            float p = sp[r * PS + j];
#pragma unroll
            for (int i = 0; i < CPT; i++) {
                int c = sub + 4 * i;
                if (c < D) o[i] += p * sv[j * DP + c];
            }
        }
    }
    if (valid) {
        float inv = 1.0f / l;
        i64 base = ((i64)(s0 + qi) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < CPT; i++) {
            int c = sub + 4 * i;
            if (c < D) out[base + c] = o[i] * inv;
        }
        if (sub == 0) lse[(i64)h * tokens + s0 + qi] = m + logf(l);
    }
}

// delta[h, t] = Σ_c dout[t, h, c] · out[t, h, c]
extern "C" __global__ void attn_bwd_delta(const float* __restrict__ dout, const float* __restrict__ out,
                                          float* __restrict__ delta, int tokens, int heads) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)tokens * heads) return;
    i64 t = i / heads, h = i % heads;
    const float* a = dout + i * D;
    const float* b = out + i * D;
    float acc = 0.0f;
    for (int c = 0; c < D; c++) acc += a[c] * b[c];
    delta[h * tokens + t] = acc;
}

// dq for one query tile of one head (same thread layout as the forward).
extern "C" __global__ void __launch_bounds__(NT) attn_bwd_dq(
    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq, const int* __restrict__ tiles, int tokens, int heads, int kv_heads,
    float scale) {
    extern __shared__ float smem[];
    float* sq = smem;
    float* sdo = sq + BQ * DP;
    float* sk = sdo + BQ * DP;
    float* sv = sk + BK * DP;
    float* sp = sv + BK * DP;
    int tile = blockIdx.x, h = blockIdx.y;
    int s0 = tiles[3 * tile], slen = tiles[3 * tile + 1], q0 = tiles[3 * tile + 2];
    int g = h / (heads / kv_heads);
    int tid = threadIdx.x, r = tid >> 2, sub = tid & 3;
    int qrows = min(BQ, slen - q0);
    bool valid = r < qrows;
    int qi = q0 + r;
    load_rows(sq, q, s0, q0, BQ, slen, heads, h);
    load_rows(sdo, dout, s0, q0, BQ, slen, heads, h);
    float lr = valid ? lse[(i64)h * tokens + s0 + qi] : 0.0f;
    float dr = valid ? delta[(i64)h * tokens + s0 + qi] : 0.0f;
    float acc[CPT];
#pragma unroll
    for (int i = 0; i < CPT; i++) acc[i] = 0.0f;
    int kend = q0 + qrows;
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        load_rows(sk, k, s0, k0, BK, slen, kv_heads, g);
        load_rows(sv, v, s0, k0, BK, slen, kv_heads, g);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            int j = sub * 8 + jj, kj = k0 + j;
            float s = 0.0f, dp = 0.0f;
#pragma unroll 16
            for (int c = 0; c < D; c++) {
                s += sq[r * DP + c] * sk[j * DP + c];
                dp += sdo[r * DP + c] * sv[j * DP + c];
            }
            float p = (valid && kj <= qi) ? expf(s * scale - lr) : 0.0f;
            sp[r * PS + j] = p * (dp - dr);
        }
        __syncwarp();
        for (int j = 0; j < BK; j++) {
            float ds = sp[r * PS + j];
#pragma unroll
            for (int i = 0; i < CPT; i++) {
                int c = sub + 4 * i;
                if (c < D) acc[i] += ds * sk[j * DP + c];
            }
        }
    }
    if (valid) {
        i64 base = ((i64)(s0 + qi) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < CPT; i++) {
            int c = sub + 4 * i;
            if (c < D) dq[base + c] = acc[i] * scale;
        }
    }
}

// dk, dv for one key tile of one kv head, over every query head of its group.
extern "C" __global__ void __launch_bounds__(NT) attn_bwd_dkv(
    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk, float* __restrict__ dv, const int* __restrict__ tiles, int tokens,
    int heads, int kv_heads, float scale) {
    extern __shared__ float smem[];
    float* sk = smem;
    float* sv = sk + BKV * DP;
    float* sq = sv + BKV * DP;
    float* sdo = sq + BQ2 * DP;
    float* sp = sdo + BQ2 * DP;
    float* sds = sp + BQ2 * PS;
    float* sl = sds + BQ2 * PS;
    float* sd = sl + BQ2;
    int tile = blockIdx.x, g = blockIdx.y;
    int s0 = tiles[3 * tile], slen = tiles[3 * tile + 1], k0 = tiles[3 * tile + 2];
    int group = heads / kv_heads;
    int tid = threadIdx.x, kr = tid >> 3, sub = tid & 7;
    load_rows(sk, k, s0, k0, BKV, slen, kv_heads, g);
    load_rows(sv, v, s0, k0, BKV, slen, kv_heads, g);
    float ak[CPT8], av[CPT8];
#pragma unroll
    for (int i = 0; i < CPT8; i++) { ak[i] = 0.0f; av[i] = 0.0f; }
    for (int hh = 0; hh < group; hh++) {
        int h = g * group + hh;
        for (int q0 = k0; q0 < slen; q0 += BQ2) {
            __syncthreads();
            load_rows(sq, q, s0, q0, BQ2, slen, heads, h);
            load_rows(sdo, dout, s0, q0, BQ2, slen, heads, h);
            if (tid < BQ2) {
                bool ok = q0 + tid < slen;
                sl[tid] = ok ? lse[(i64)h * tokens + s0 + q0 + tid] : 0.0f;
                sd[tid] = ok ? delta[(i64)h * tokens + s0 + q0 + tid] : 0.0f;
            }
            __syncthreads();
            // probabilities and dS: thread (i = tid / 8, j = tid % 8 + 8e)
            {
                int i = tid >> 3, qi = q0 + i;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int j = (tid & 7) + 8 * e, kj = k0 + j;
                    float s = 0.0f, dp = 0.0f;
#pragma unroll 16
                    for (int c = 0; c < D; c++) {
                        s += sq[i * DP + c] * sk[j * DP + c];
                        dp += sdo[i * DP + c] * sv[j * DP + c];
                    }
                    bool ok = qi < slen && kj < slen && kj <= qi;
                    float p = ok ? expf(s * scale - sl[i]) : 0.0f;
                    sp[i * PS + j] = p;
                    sds[i * PS + j] = p * (dp - sd[i]);
                }
            }
            __syncthreads();
            for (int i = 0; i < BQ2; i++) {
                float p = sp[i * PS + kr], ds = sds[i * PS + kr];
#pragma unroll
                for (int x = 0; x < CPT8; x++) {
                    int c = sub + 8 * x;
                    if (c < D) {
                        av[x] += p * sdo[i * DP + c];
                        ak[x] += ds * sq[i * DP + c];
                    }
                }
            }
        }
    }
    if (k0 + kr < slen) {
        i64 base = ((i64)(s0 + k0 + kr) * kv_heads + g) * D;
#pragma unroll
        for (int x = 0; x < CPT8; x++) {
            int c = sub + 8 * x;
            if (c < D) {
                dk[base + c] = ak[x] * scale;
                dv[base + c] = av[x];
            }
        }
    }
}
