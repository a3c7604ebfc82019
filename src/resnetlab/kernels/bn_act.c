/* Fused training-mode BatchNorm + (residual addition) + ReLU on channels_last float32 or
 * bfloat16 activations (parameters and statistics in float32).
 *
 * A channels_last activation of shape (N, C, H, W) is a row-major (M = N*H*W, C) matrix,
 * walked as one flat array in chunks of whole rows whose length is a multiple of the vector
 * width, with every per-channel parameter repeated to the chunk's length; so the loops are
 * contiguous and vectorise whatever C is. The per-channel sums run over blocks of rows with
 * up to four vectors of accumulators held in registers, in float, then go into doubles.
 * Fusing saves whole passes over memory: for a BN-ReLU pair, PyTorch's separate CPU ops read
 * or write the activation about 13 times (forward and backward), these kernels 8.
 * bfloat16 activations (bf16 autocast training) are widened to float block by block into a
 * per-thread buffer that stays in cache, computed in float as float32 ones are, and
 * rounded once on the way out, as PyTorch rounds (to nearest even); float32 ones are used
 * in place, so that path is unchanged.
 * Built at run time by resnetlab/kernels/__init__.py, linked to PyTorch's own OpenMP.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NV 4            /* vectors summed at once: 4 x 2 sums stay in 16 registers */
#define BLOCK_FLOATS 2048   /* floats of one input per block summed in float (8 KiB) */
#define STREAM_FLOATS 256   /* least chunk of the element-wise loops */

/* Eight floats, one AVX2 register; GCC and Clang lower it to whatever the CPU has. */
#define VL 8
typedef float v8 __attribute__((vector_size(4 * VL)));
typedef int32_t v8i __attribute__((vector_size(4 * VL)));

static inline v8 ld(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline void add_lanes(double *acc, v8 v) {
    for (int i = 0; i < VL; ++i) acc[i] += v[i];
}

/* bfloat16 is the upper half of a float's bits. */
static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* PyTorch's rounding (c10::BFloat16): to nearest even; NaN becomes the quiet NaN 0x7FC0. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return f != f ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* Element e of an activation (bf: bfloat16, else float32), as a float. */
static inline float at(const void *p, int bf, int64_t e) {
    return bf ? bf16_to_float(((const uint16_t *)p)[e]) : ((const float *)p)[e];
}

static inline void put(void *p, int bf, int64_t e, float v) {
    if (bf) ((uint16_t *)p)[e] = float_to_bf16(v);
    else ((float *)p)[e] = v;
}

/* Elements [e, e + n) of an activation (NULL stays NULL) as floats: in place for float32,
 * else widened into buf. */
static const float *view(const void *p, int bf, int64_t e, int64_t n, float *restrict buf) {
    if (!p) return NULL;
    if (!bf) return (const float *)p + e;
    const uint16_t *restrict h = (const uint16_t *)p + e;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(h[i]);
    return buf;
}

/* Where to write elements [e, e + n) of an output as floats: in place for float32, else
 * buf, which `commit` then rounds into the output. */
static float *out_view(void *p, int bf, int64_t e, float *buf) {
    return !p ? NULL : bf ? buf : (float *)p + e;
}

static void commit(void *p, int bf, int64_t e, int64_t n, const float *restrict buf) {
    if (!p || !bf) return;
    uint16_t *restrict h = (uint16_t *)p + e;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(buf[i]);
}

/* A per-thread buffer of n floats for each of k bfloat16 operands; NULL for float32. */
static float *buffers(int bf, int k, int64_t n) {
    return bf ? malloc(sizeof(float) * (size_t)k * (size_t)n) : NULL;
}

static int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

/* Chunk length w: whole rows and whole vectors, the least common multiple of c and VL. */
static int64_t chunk_of(int64_t c) { return c / gcd(c, VL) * VL; }

/* Vectors summed together (their sums stay in registers): 4, 2 or 1, dividing w / VL. */
static int group_of(int64_t w) { return (w / VL) % 4 == 0 ? 4 : (w / VL) % 2 == 0 ? 2 : 1; }

/* Chunk of the element-wise kernels: whole rows, at least STREAM_FLOATS, for long loops. */
static int64_t stream_chunk_of(int64_t c) {
    int64_t w = chunk_of(c);
    return w * ((STREAM_FLOATS + w - 1) / w);
}

/* Rows per block: BLOCK_FLOATS of each input, so a block's float sums stay short. */
static int64_t block_rows(int64_t w) { return w >= BLOCK_FLOATS ? 1 : BLOCK_FLOATS / w; }

/* v repeated to length w (w a multiple of c); caller frees. */
static float *repeat(const float *v, int64_t c, int64_t w) {
    float *out = malloc(sizeof(float) * w);
    for (int64_t i = 0; i < w; ++i) out[i] = v[i % c];
    return out;
}

/* The first row of activation x as floats, repeated to length w; caller frees. */
static float *repeat_row(const void *x, int bf, int64_t c, int64_t w) {
    float *out = malloc(sizeof(float) * w);
    for (int64_t i = 0; i < w; ++i) out[i] = at(x, bf, i % c);
    return out;
}

/* This thread's element range [*lo, *hi): whole chunks, the last thread takes the rest. */
static void span_of_thread(int64_t n, int64_t w, int64_t *lo, int64_t *hi) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t chunks = n / w;
    *lo = chunks * t / nt * w;
    *hi = t == nt - 1 ? n : chunks * (t + 1) / nt * w;
}

/* Room for every thread's partial sums: two arrays of length w each, zeroed. */
static double *partials(int nt, int64_t w) { return calloc((size_t)nt * 2 * w, sizeof(double)); }

/* Adds the threads' partials into per-channel totals in thread order, so that results do
 * not depend on which thread finished first. */
static void fold(const double *part, int nt, int64_t w, int64_t c, double *tot_a,
                 double *tot_b) {
    for (int t = 0; t < nt; ++t)
        for (int64_t i = 0; i < w; ++i) {
            tot_a[i % c] += part[(size_t)t * 2 * w + i];
            tot_b[i % c] += part[(size_t)t * 2 * w + w + i];
        }
}

/* Sums over `rows` rows (stride w) of the nv vectors at x: of d = x - k and of d*d. */
static inline __attribute__((always_inline)) void stats_block(
    const float *restrict x, const float *k, int64_t rows, int64_t w, int nv, double *ps,
    double *pq) {
    v8 s[MAX_NV] = {{0}}, q[MAX_NV] = {{0}}, kv[MAX_NV];
    for (int i = 0; i < nv; ++i) kv[i] = ld(k + i * VL);
    for (int64_t r = 0; r < rows; ++r)
        for (int i = 0; i < nv; ++i) {
            v8 dv = ld(x + r * w + i * VL) - kv[i];
            s[i] += dv;
            q[i] += dv * dv;
        }
    for (int i = 0; i < nv; ++i) {
        add_lanes(ps + i * VL, s[i]);
        add_lanes(pq + i * VL, q[i]);
    }
}

/* Biased mean and variance per channel in one pass. The sums are of d = x - x0, x0 the first
 * row, so a large mean does not cancel the variance away. */
static void stats(const void *x, int bf, int64_t m, int64_t c, double *restrict mean,
                  double *restrict var) {
    int64_t w = chunk_of(c), n = m * c, br = block_rows(w);
    int nv = group_of(w);
    float *x0 = repeat_row(x, bf, c, w);
    double *sd = calloc(2 * c, sizeof(double)), *sdd = sd + c;
    int nt = omp_get_max_threads();
    double *part = partials(nt, w);
#pragma omp parallel
    {
        int64_t lo, hi;
        span_of_thread(n, w, &lo, &hi);
        double *ps = part + (size_t)omp_get_thread_num() * 2 * w, *pq = ps + w;
        int64_t whole = lo + (hi - lo) / w * w;
        float *buf = buffers(bf, 1, br * w);
        for (int64_t e0 = lo; e0 < whole; e0 += br * w) {
            int64_t rows = (whole - e0) / w < br ? (whole - e0) / w : br;
            const float *xr = view(x, bf, e0, rows * w, buf);
            for (int64_t j = 0; j < w; j += nv * VL) {
                const float *xb = xr + j;
                if (nv == 4) stats_block(xb, x0 + j, rows, w, 4, ps + j, pq + j);
                else if (nv == 2) stats_block(xb, x0 + j, rows, w, 2, ps + j, pq + j);
                else stats_block(xb, x0 + j, rows, w, 1, ps + j, pq + j);
            }
        }
        for (int64_t e = whole; e < hi; ++e) { /* the last thread's part chunk */
            float dv = at(x, bf, e) - x0[e - whole];
            ps[e - whole] += dv;
            pq[e - whole] += dv * dv;
        }
        free(buf);
    }
    fold(part, nt, w, c, sd, sdd);
    free(part);
    for (int64_t j = 0; j < c; ++j) {
        double md = sd[j] / (double)m, v = sdd[j] / (double)m - md * md;
        mean[j] = at(x, bf, j) + md;
        var[j] = v < 0.0 ? 0.0 : v; /* rounding can dip below 0; NaN stays */
    }
    free(sd);
    free(x0);
}

/* y = max(0, a*x + b + res), res optional. */
static void apply(const void *x, const void *res, int bf, const float *a, const float *b,
                  void *y, int64_t m, int64_t c) {
    int64_t w = stream_chunk_of(c), n = m * c;
    float *aw = repeat(a, c, w), *bw = repeat(b, c, w);
#pragma omp parallel
    {
        int64_t lo, hi;
        span_of_thread(n, w, &lo, &hi);
        float *buf = buffers(bf, 3, w);
        for (int64_t e = lo; e < hi; e += w) {
            int64_t len = hi - e < w ? hi - e : w;
            const float *restrict xe = view(x, bf, e, len, buf);
            float *restrict ye = out_view(y, bf, e, bf ? buf + w : NULL);
            if (res) {
                const float *restrict re = view(res, bf, e, len, bf ? buf + 2 * w : NULL);
#pragma omp simd
                for (int64_t j = 0; j < len; ++j) {
                    float v = aw[j] * xe[j] + bw[j] + re[j];
                    ye[j] = v < 0.f ? 0.f : v; /* NaN stays NaN, as in torch.relu */
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < len; ++j) {
                    float v = aw[j] * xe[j] + bw[j];
                    ye[j] = v < 0.f ? 0.f : v; /* NaN stays NaN, as in torch.relu */
                }
            }
            commit(y, bf, e, len, ye);
        }
        free(buf);
    }
    free(aw);
    free(bw);
}

/* Sums over `rows` rows (stride w) of u and u*(x - mean) for the nv vectors at offset 0;
 * u is g where the ReLU passed (y > 0 if y, else a*x + b > 0), else 0; written to gm if set. */
static inline __attribute__((always_inline)) void grad_block(
    const float *restrict g, const float *restrict x, const float *restrict y,
    float *restrict gm, const float *a, const float *b, const float *mean, int64_t rows,
    int64_t w, int nv, double *pu, double *puv) {
    v8 s[MAX_NV] = {{0}}, q[MAX_NV] = {{0}}, av[MAX_NV], bv[MAX_NV], mv[MAX_NV], zero = {0};
    for (int i = 0; i < nv; ++i) {
        av[i] = ld(a + i * VL);
        bv[i] = ld(b + i * VL);
        mv[i] = ld(mean + i * VL);
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int i = 0; i < nv; ++i) {
            int64_t e = r * w + i * VL;
            v8 xv = ld(x + e);
            v8i keep = y ? (ld(y + e) > zero) : (av[i] * xv + bv[i] > zero);
            v8 u = (v8)((v8i)ld(g + e) & keep);
            if (gm) st(gm + e, u);
            s[i] += u;
            q[i] += u * (xv - mv[i]);
        }
    for (int i = 0; i < nv; ++i) {
        add_lanes(pu + i * VL, s[i]);
        add_lanes(puv + i * VL, q[i]);
    }
}

/* Per channel, the sums of u and u*(x - mean), u the gradient g masked by the ReLU: y > 0
 * when the output y is given (a residual was added), else a*x + b > 0. With y given, u is
 * also written to gm: it is the gradient of the residual. */
static void reduce_grad(const void *g, const void *x, const void *y, int bf, const float *a,
                        const float *b, const float *mean, void *gm, int64_t m, int64_t c,
                        double *restrict sum_u, double *restrict sum_uv) {
    int64_t w = chunk_of(c), n = m * c, br = block_rows(w);
    int nv = group_of(w);
    float *aw = repeat(a, c, w), *bw = repeat(b, c, w), *mw = repeat(mean, c, w);
    memset(sum_u, 0, sizeof(double) * c);
    memset(sum_uv, 0, sizeof(double) * c);
    int nt = omp_get_max_threads();
    double *part = partials(nt, w);
#pragma omp parallel
    {
        int64_t lo, hi;
        span_of_thread(n, w, &lo, &hi);
        double *pu = part + (size_t)omp_get_thread_num() * 2 * w, *puv = pu + w;
        int64_t whole = lo + (hi - lo) / w * w, bn = br * w;
        float *buf = buffers(bf, 4, bn);
        for (int64_t e0 = lo; e0 < whole; e0 += bn) {
            int64_t rows = (whole - e0) / w < br ? (whole - e0) / w : br, len = rows * w;
            const float *gr = view(g, bf, e0, len, buf), *xr = view(x, bf, e0, len, bf ? buf + bn : NULL),
                        *yr = view(y, bf, e0, len, bf ? buf + 2 * bn : NULL);
            float *gmr = out_view(gm, bf, e0, bf ? buf + 3 * bn : NULL);
            for (int64_t j = 0; j < w; j += nv * VL) {
                const float *yo = yr ? yr + j : NULL;
                float *gmo = gmr ? gmr + j : NULL;
#define GRAD_BLOCK(NV) grad_block(gr + j, xr + j, yo, gmo, aw + j, bw + j, mw + j, rows, w, \
                                  NV, pu + j, puv + j)
                if (nv == 4) GRAD_BLOCK(4);
                else if (nv == 2) GRAD_BLOCK(2);
                else GRAD_BLOCK(1);
#undef GRAD_BLOCK
            }
            commit(gm, bf, e0, len, gmr);
        }
        for (int64_t e = whole; e < hi; ++e) { /* the last thread's part chunk */
            int64_t j = e - whole;
            float xe = at(x, bf, e);
            int keep = y ? at(y, bf, e) > 0.f : aw[j] * xe + bw[j] > 0.f;
            float u = keep ? at(g, bf, e) : 0.f;
            if (gm) put(gm, bf, e, u);
            pu[j] += u;
            puv[j] += u * (xe - mw[j]);
        }
        free(buf);
    }
    fold(part, nt, w, c, sum_u, sum_uv);
    free(part);
    free(aw);
    free(bw);
    free(mw);
}

/* dx = a*u + p*x + q, u the masked gradient: read from gm when given, else g masked by
 * a*x + b > 0. */
static void grad_input(const void *g, const void *gm, const void *x, int bf, const float *a,
                       const float *b, const float *p, const float *q, void *dx, int64_t m,
                       int64_t c) {
    int64_t w = stream_chunk_of(c), n = m * c;
    float *aw = repeat(a, c, w), *bw = repeat(b, c, w), *pw = repeat(p, c, w),
          *qw = repeat(q, c, w);
#pragma omp parallel
    {
        int64_t lo, hi;
        span_of_thread(n, w, &lo, &hi);
        float *buf = buffers(bf, 3, w);
        for (int64_t e = lo; e < hi; e += w) {
            int64_t len = hi - e < w ? hi - e : w;
            const float *restrict xe = view(x, bf, e, len, buf);
            float *restrict de = out_view(dx, bf, e, bf ? buf + w : NULL);
            if (gm) {
                const float *restrict ue = view(gm, bf, e, len, bf ? buf + 2 * w : NULL);
#pragma omp simd
                for (int64_t j = 0; j < len; ++j) de[j] = aw[j] * ue[j] + pw[j] * xe[j] + qw[j];
            } else {
                const float *restrict ge = view(g, bf, e, len, bf ? buf + 2 * w : NULL);
#pragma omp simd
                for (int64_t j = 0; j < len; ++j) {
                    float u = aw[j] * xe[j] + bw[j] > 0.f ? ge[j] : 0.f;
                    de[j] = aw[j] * u + pw[j] * xe[j] + qw[j];
                }
            }
            commit(dx, bf, e, len, de);
        }
        free(buf);
    }
    free(aw);
    free(bw);
    free(pw);
    free(qw);
}

/* BN as y = a*x + b per channel. Forward and backward derive a and b alike from the saved
 * float mean and 1/std, so the ReLU mask the backward recomputes from x matches the forward's. */
static void affine(const float *weight, const float *bias, const float *mean,
                   const float *invstd, float *a, float *b, int64_t c) {
    for (int64_t j = 0; j < c; ++j) {
        a[j] = weight[j] * invstd[j];
        b[j] = bias[j] - mean[j] * a[j];
    }
}

/* Forward: y = relu(BN(x) + res) with the batch's statistics (res may be NULL); x, res and y
 * are bfloat16 when bf is set, else float32. Writes the
 * batch mean and 1/sqrt(var + eps) for the backward pass, and moves the running statistics
 * toward the batch's (the running variance unbiased, as PyTorch does). */
void bn_act_forward(const void *x, const void *res, const float *weight, const float *bias,
                    float *running_mean, float *running_var, double momentum, double eps,
                    void *y, float *save_mean, float *save_invstd, int64_t m, int64_t c,
                    int bf) {
    double *mean = malloc(sizeof(double) * 2 * c), *var = mean + c;
    float *a = malloc(sizeof(float) * 2 * c), *b = a + c;
    stats(x, bf, m, c, mean, var);
    for (int64_t j = 0; j < c; ++j) {
        save_mean[j] = (float)mean[j];
        save_invstd[j] = (float)(1.0 / sqrt(var[j] + eps));
        running_mean[j] = (float)((1.0 - momentum) * running_mean[j] + momentum * mean[j]);
        double unbiased = m > 1 ? var[j] * (double)m / (double)(m - 1) : var[j];
        running_var[j] = (float)((1.0 - momentum) * running_var[j] + momentum * unbiased);
    }
    affine(weight, bias, save_mean, save_invstd, a, b, c);
    apply(x, res, bf, a, b, y, m, c);
    free(mean);
    free(a);
}

/* Backward of bn_act_forward. y (the output) is given when a residual was added: the ReLU's
 * mask then comes from it, and gm receives the residual's gradient. Without it the mask is
 * recomputed from x, which saves reading y. */
void bn_act_backward(const void *g, const void *x, const void *y, const float *weight,
                     const float *bias, const float *mean, const float *invstd, void *gm,
                     void *dx, float *dweight, float *dbias, int64_t m, int64_t c, int bf) {
    double *su = malloc(sizeof(double) * 2 * c), *suv = su + c;
    float *a = malloc(sizeof(float) * 4 * c), *b = a + c, *p = b + c, *q = p + c;
    affine(weight, bias, mean, invstd, a, b, c);
    reduce_grad(g, x, y, bf, a, b, mean, gm, m, c, su, suv);
    /* dx = a * (u - mean(u) - xhat * mean(u * xhat)), xhat = (x - mean) * invstd, so
     * dx = a*u + p*x + q with the per-channel p and q below. */
    for (int64_t j = 0; j < c; ++j) {
        double is = invstd[j], pj = -(double)a[j] * is * is * suv[j] / (double)m;
        p[j] = (float)pj;
        q[j] = (float)(-(double)a[j] * su[j] / (double)m - mean[j] * pj);
        dweight[j] = (float)(suv[j] * is);
        dbias[j] = (float)su[j];
    }
    grad_input(g, y ? gm : NULL, x, bf, a, b, p, q, dx, m, c);
    free(su);
    free(a);
}
