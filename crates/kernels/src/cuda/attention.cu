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

// ---------------------------------------------------------------------------------------------
// Register-tiled variants for head dims that are multiples of 16 up to 128 (LLaMA's 64 and 128):
// 64×64 tiles, every thread computes a 4×4 block of scores from float4 shared-memory reads
// (rows rg*4+a, keys kg+16b: conflict-free), and owns 4 rows × D/16 columns of its outputs.
// Same algorithm and layouts as above; the host picks them when the head dim allows.
#if (D % 16 == 0) && (D <= 128)
#define TB 64               // rows and keys per tile
#define DS (D + 4)          // float4-aligned padded stride of D-wide rows
#define PT (TB + 4)         // stride of the transposed probability tiles
#define CW (D / 16)         // output columns per thread

__device__ __forceinline__ void load_tile4(float* dst, const float* __restrict__ src, int s0, int r0,
                                           int slen, int nheads, int head) {
    for (int i = threadIdx.x; i < TB * (D / 4); i += NT) {
        int rr = i / (D / 4), c4 = i % (D / 4);
        int t = r0 + rr;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (t < slen) v = *reinterpret_cast<const float4*>(src + ((i64)(s0 + t) * nheads + head) * D + c4 * 4);
        *reinterpret_cast<float4*>(dst + rr * DS + c4 * 4) = v;
    }
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ float rowgroup_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
}
__device__ __forceinline__ float rowgroup_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    return x + __shfl_xor_sync(0xffffffffu, x, 8);
}

extern "C" __global__ void __launch_bounds__(NT) attn_fwd_rt(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse, const int* __restrict__ tiles, int tokens,
    int heads, int kv_heads, float scale) {
    extern __shared__ float4 smem4[];
    float* sq = reinterpret_cast<float*>(smem4);
    float* sk = sq + TB * DS;
    float* sv = sk + TB * DS;
    float* sp = sv + TB * DS;  // [key][row]
    int tile = blockIdx.x, h = blockIdx.y;
    int s0 = tiles[3 * tile], slen = tiles[3 * tile + 1], q0 = tiles[3 * tile + 2];
    int g = h / (heads / kv_heads);
    int tid = threadIdx.x, rg = tid >> 4, kg = tid & 15;
    int qrows = min(TB, slen - q0);
    load_tile4(sq, q, s0, q0, slen, heads, h);
    float o[4][CW];
    float m[4], l[4];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        m[a] = -INFINITY;
        l[a] = 0.0f;
#pragma unroll
        for (int c = 0; c < CW; c++) o[a][c] = 0.0f;
    }
    int kend = q0 + qrows;
    for (int k0 = 0; k0 < kend; k0 += TB) {
        __syncthreads();
        load_tile4(sk, k, s0, k0, slen, kv_heads, g);
        load_tile4(sv, v, s0, k0, slen, kv_heads, g);
        __syncthreads();
        float s[4][4];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int b = 0; b < 4; b++) s[a][b] = 0.0f;
#pragma unroll 4
        for (int c = 0; c < D; c += 4) {
            float4 qa[4], kb[4];
#pragma unroll
            for (int a = 0; a < 4; a++) qa[a] = *reinterpret_cast<const float4*>(sq + (rg * 4 + a) * DS + c);
#pragma unroll
            for (int b = 0; b < 4; b++) kb[b] = *reinterpret_cast<const float4*>(sk + (kg + 16 * b) * DS + c);
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) s[a][b] = dot4(qa[a], kb[b], s[a][b]);
        }
#pragma unroll
        for (int a = 0; a < 4; a++) {
            int row = rg * 4 + a, qi = q0 + row;
            bool rv = row < qrows;
            float mx = -INFINITY;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                int kj = k0 + kg + 16 * b;
                float x = s[a][b] * scale;
                if (!rv || kj > qi) x = -INFINITY;
                s[a][b] = x;
                mx = fmaxf(mx, x);
            }
            mx = rowgroup_max(mx);
            float mnew = fmaxf(m[a], mx);
            float alpha = (m[a] == -INFINITY) ? 0.0f : expf(m[a] - mnew);
            float rs = 0.0f;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                float p = (s[a][b] == -INFINITY) ? 0.0f : expf(s[a][b] - mnew);
                sp[(kg + 16 * b) * PT + row] = p;
                rs += p;
            }
            rs = rowgroup_sum(rs);
            l[a] = l[a] * alpha + rs;
            m[a] = mnew;
#pragma unroll
            for (int c = 0; c < CW; c++) o[a][c] *= alpha;
        }
        __syncwarp();
#pragma unroll 4
        for (int j = 0; j < TB; j++) {
            float4 p = *reinterpret_cast<const float4*>(sp + j * PT + rg * 4);
            const float* vr = sv + j * DS + kg * CW;
#pragma unroll
            for (int c = 0; c < CW; c++) {
                float x = vr[c];
                o[0][c] = fmaf(p.x, x, o[0][c]);
                o[1][c] = fmaf(p.y, x, o[1][c]);
                o[2][c] = fmaf(p.z, x, o[2][c]);
                o[3][c] = fmaf(p.w, x, o[3][c]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int row = rg * 4 + a;
        if (row < qrows) {
            float inv = 1.0f / l[a];
            i64 base = ((i64)(s0 + q0 + row) * heads + h) * D + kg * CW;
#pragma unroll
            for (int c = 0; c < CW; c++) out[base + c] = o[a][c] * inv;
            if (kg == 0) lse[(i64)h * tokens + s0 + q0 + row] = m[a] + logf(l[a]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT) attn_bwd_dq_rt(
    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq, const int* __restrict__ tiles, int tokens, int heads, int kv_heads,
    float scale) {
    extern __shared__ float4 smem4[];
    float* sq = reinterpret_cast<float*>(smem4);
    float* sdo = sq + TB * DS;
    float* sk = sdo + TB * DS;
    float* sv = sk + TB * DS;
    float* sp = sv + TB * DS;  // dS, [key][row]
    int tile = blockIdx.x, h = blockIdx.y;
    int s0 = tiles[3 * tile], slen = tiles[3 * tile + 1], q0 = tiles[3 * tile + 2];
    int g = h / (heads / kv_heads);
    int tid = threadIdx.x, rg = tid >> 4, kg = tid & 15;
    int qrows = min(TB, slen - q0);
    load_tile4(sq, q, s0, q0, slen, heads, h);
    load_tile4(sdo, dout, s0, q0, slen, heads, h);
    float lr[4], dr[4], acc[4][CW];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int row = rg * 4 + a;
        bool rv = row < qrows;
        lr[a] = rv ? lse[(i64)h * tokens + s0 + q0 + row] : 0.0f;
        dr[a] = rv ? delta[(i64)h * tokens + s0 + q0 + row] : 0.0f;
#pragma unroll
        for (int c = 0; c < CW; c++) acc[a][c] = 0.0f;
    }
    int kend = q0 + qrows;
    for (int k0 = 0; k0 < kend; k0 += TB) {
        __syncthreads();
        load_tile4(sk, k, s0, k0, slen, kv_heads, g);
        load_tile4(sv, v, s0, k0, slen, kv_heads, g);
        __syncthreads();
        float s[4][4], dp[4][4];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int b = 0; b < 4; b++) { s[a][b] = 0.0f; dp[a][b] = 0.0f; }
#pragma unroll 2
        for (int c = 0; c < D; c += 4) {
            float4 qa[4], da[4], kb[4], vb[4];
#pragma unroll
            for (int a = 0; a < 4; a++) {
                qa[a] = *reinterpret_cast<const float4*>(sq + (rg * 4 + a) * DS + c);
                da[a] = *reinterpret_cast<const float4*>(sdo + (rg * 4 + a) * DS + c);
            }
#pragma unroll
            for (int b = 0; b < 4; b++) {
                kb[b] = *reinterpret_cast<const float4*>(sk + (kg + 16 * b) * DS + c);
                vb[b] = *reinterpret_cast<const float4*>(sv + (kg + 16 * b) * DS + c);
            }
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    s[a][b] = dot4(qa[a], kb[b], s[a][b]);
                    dp[a][b] = dot4(da[a], vb[b], dp[a][b]);
                }
        }
#pragma unroll
        for (int a = 0; a < 4; a++) {
            int row = rg * 4 + a, qi = q0 + row;
            bool rv = row < qrows;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                int kj = k0 + kg + 16 * b;
                float p = (rv && kj <= qi) ? expf(s[a][b] * scale - lr[a]) : 0.0f;
                sp[(kg + 16 * b) * PT + row] = p * (dp[a][b] - dr[a]);
            }
        }
        __syncwarp();
#pragma unroll 4
        for (int j = 0; j < TB; j++) {
            float4 d = *reinterpret_cast<const float4*>(sp + j * PT + rg * 4);
            const float* kr = sk + j * DS + kg * CW;
#pragma unroll
            for (int c = 0; c < CW; c++) {
                float x = kr[c];
                acc[0][c] = fmaf(d.x, x, acc[0][c]);
                acc[1][c] = fmaf(d.y, x, acc[1][c]);
                acc[2][c] = fmaf(d.z, x, acc[2][c]);
                acc[3][c] = fmaf(d.w, x, acc[3][c]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int row = rg * 4 + a;
        if (row < qrows) {
            i64 base = ((i64)(s0 + q0 + row) * heads + h) * D + kg * CW;
#pragma unroll
            for (int c = 0; c < CW; c++) dq[base + c] = acc[a][c] * scale;
        }
    }
}

// One query head's share of dk, dv for one 64-key tile: thread (kr = tid / 16 → keys kr*4+a,
// qg = tid % 16 → queries qg+16b of each query tile; output columns qg*CW..). The shares go to
// dk_part/dv_part [heads, tokens, D]; attn_bwd_dkv_reduce sums a kv group's heads in order.
extern "C" __global__ void __launch_bounds__(NT) attn_bwd_dkv_rt(
    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk_part, float* __restrict__ dv_part, const int* __restrict__ tiles, int tokens,
    int heads, int kv_heads, float scale) {
    extern __shared__ float4 smem4[];
    float* sk = reinterpret_cast<float*>(smem4);
    float* sv = sk + TB * DS;
    float* sq = sv + TB * DS;
    float* sdo = sq + TB * DS;
    float* sp = sdo + TB * DS;  // P, [query][key]
    float* sds = sp + TB * PT;  // dS, [query][key]
    float* sl = sds + TB * PT;
    float* sd = sl + TB;
    int tile = blockIdx.x, h = blockIdx.y;
    int s0 = tiles[3 * tile], slen = tiles[3 * tile + 1], k0 = tiles[3 * tile + 2];
    int g = h / (heads / kv_heads);
    int tid = threadIdx.x, kr = tid >> 4, qg = tid & 15;
    load_tile4(sk, k, s0, k0, slen, kv_heads, g);
    load_tile4(sv, v, s0, k0, slen, kv_heads, g);
    float ak[4][CW], av[4][CW];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int c = 0; c < CW; c++) { ak[a][c] = 0.0f; av[a][c] = 0.0f; }
    {
        for (int q0 = k0; q0 < slen; q0 += TB) {
            __syncthreads();
            load_tile4(sq, q, s0, q0, slen, heads, h);
            load_tile4(sdo, dout, s0, q0, slen, heads, h);
            if (tid < TB) {
                bool ok = q0 + tid < slen;
                sl[tid] = ok ? lse[(i64)h * tokens + s0 + q0 + tid] : 0.0f;
                sd[tid] = ok ? delta[(i64)h * tokens + s0 + q0 + tid] : 0.0f;
            }
            __syncthreads();
            float s[4][4], dp[4][4];
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) { s[a][b] = 0.0f; dp[a][b] = 0.0f; }
#pragma unroll 2
            for (int c = 0; c < D; c += 4) {
                float4 ka[4], va[4], qb[4], db[4];
#pragma unroll
                for (int a = 0; a < 4; a++) {
                    ka[a] = *reinterpret_cast<const float4*>(sk + (kr * 4 + a) * DS + c);
                    va[a] = *reinterpret_cast<const float4*>(sv + (kr * 4 + a) * DS + c);
                }
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    qb[b] = *reinterpret_cast<const float4*>(sq + (qg + 16 * b) * DS + c);
                    db[b] = *reinterpret_cast<const float4*>(sdo + (qg + 16 * b) * DS + c);
                }
#pragma unroll
                for (int a = 0; a < 4; a++)
#pragma unroll
                    for (int b = 0; b < 4; b++) {
                        s[a][b] = dot4(ka[a], qb[b], s[a][b]);
                        dp[a][b] = dot4(va[a], db[b], dp[a][b]);
                    }
            }
#pragma unroll
            for (int a = 0; a < 4; a++) {
                int kj = k0 + kr * 4 + a;
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    int col = qg + 16 * b, qi = q0 + col;
                    bool ok = qi < slen && kj < slen && kj <= qi;
                    float p = ok ? expf(s[a][b] * scale - sl[col]) : 0.0f;
                    sp[col * PT + kr * 4 + a] = p;
                    sds[col * PT + kr * 4 + a] = p * (dp[a][b] - sd[col]);
                }
            }
            __syncthreads();
#pragma unroll 2
            for (int i = 0; i < TB; i++) {
                float4 p = *reinterpret_cast<const float4*>(sp + i * PT + kr * 4);
                float4 d = *reinterpret_cast<const float4*>(sds + i * PT + kr * 4);
                const float* dor = sdo + i * DS + qg * CW;
                const float* qr = sq + i * DS + qg * CW;
#pragma unroll
                for (int c = 0; c < CW; c++) {
                    float x = dor[c], y = qr[c];
                    av[0][c] = fmaf(p.x, x, av[0][c]);
                    av[1][c] = fmaf(p.y, x, av[1][c]);
                    av[2][c] = fmaf(p.z, x, av[2][c]);
                    av[3][c] = fmaf(p.w, x, av[3][c]);
                    ak[0][c] = fmaf(d.x, y, ak[0][c]);
                    ak[1][c] = fmaf(d.y, y, ak[1][c]);
                    ak[2][c] = fmaf(d.z, y, ak[2][c]);
                    ak[3][c] = fmaf(d.w, y, ak[3][c]);
                }
            }
        }
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int row = kr * 4 + a;
        if (k0 + row < slen) {
            i64 base = ((i64)h * tokens + s0 + k0 + row) * D + qg * CW;
#pragma unroll
            for (int c = 0; c < CW; c++) {
                dk_part[base + c] = ak[a][c];
                dv_part[base + c] = av[a][c];
            }
        }
    }
}

// dk[t, g] = scale · Σ_hh dk_part[g·group + hh, t], dv likewise, heads added in order.
extern "C" __global__ void attn_bwd_dkv_reduce(const float* __restrict__ dk_part,
                                               const float* __restrict__ dv_part, float* __restrict__ dk,
                                               float* __restrict__ dv, int tokens, int heads,
                                               int kv_heads, float scale) {
    i64 n = (i64)tokens * kv_heads * D;
    int group = heads / kv_heads;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 c = i % D, tg = i / D, g = tg % kv_heads, t = tg / kv_heads;
        float a = 0.0f, b = 0.0f;
        for (int hh = 0; hh < group; hh++) {
            i64 j = ((i64)(g * group + hh) * tokens + t) * D + c;
            a += dk_part[j];
            b += dv_part[j];
        }
        dk[i] = a * scale;
        dv[i] = b;
    }
}
#endif
