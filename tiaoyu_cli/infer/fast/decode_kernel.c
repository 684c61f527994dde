/* One decode step of one row, fp32, in C: what NumpyStep._one_row computes (infer/fast/numpy_step.py),
 * without the per-call cost of ~25 numpy calls per layer. Built on first use by kernel.py with the
 * system C compiler (cc -O3 -march=native); without a compiler the numpy step runs instead.
 *
 * Weights are the numpy step's prepared arrays, [in, out] row-major, so every product is a sum of
 * weight rows scaled by the input (y += x[i] · W[i, :]): the inner loop runs along a contiguous row
 * and vectorises without reordering any sum. Per layer, as in numpy_step.py:
 *   y = x̂ A (q‖k‖v, rotary pairs side by side);  q‖k ·= e^{i·pos·θ};  cache[L] = k, v
 *   a = softmax(q Kᵀ) V (row max subtracted);  x += a Wo;  −g‖u = x̂ GU;  x += ((−g)·u / (1 + e^{−g})) D
 * then logits = (x̂ · g_final) Eᵀ with E the [V, d] output embedding (a dot product per token).
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

static void rows_times(const float *x, const float *W, float *y, int in, int out) {
    memset(y, 0, sizeof(float) * (size_t)out);
    int i = 0;
    for (; i + 4 <= in; i += 4) {  /* four rows per pass over y: a quarter of the loads and stores of y */
        const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
        const float *w0 = W + (size_t)i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
        for (int j = 0; j < out; j++) y[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
    }
    for (; i < in; i++) {
        const float xi = x[i];
        const float *w = W + (size_t)i * out;
        for (int j = 0; j < out; j++) y[j] += xi * w[j];
    }
}

static void rms(const float *x, float *out, int d, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) out[i] = x[i] * r;
}

/* dims: d, n_layers, H, Hkv, hd, F, V, P (the cache's column capacity)
 * ptrs: per layer A, then per layer Wo, GU, D, K, V (K, V: this row's cache, [Hkv, P, hd]), then the
 *       final norm weight, E ([V, d]) and a scratch buffer of 2·d + (H + 2·Hkv)·hd + H·hd + 2·F + P floats
 * L: filled columns (the new key goes to column L); rot: (cos, sin) pairs for this position, one per
 * rotary pair of every q and k head; emb_row: the token's embedding; logits: [V] out. */
void tiaoyu_step(const int *dims, const void *const *ptrs, float eps, int L, const float *rot,
                 const float *emb_row, float *logits) {
    const int d = dims[0], n_layers = dims[1], H = dims[2], Hkv = dims[3], hd = dims[4], F = dims[5],
              V = dims[6], P = dims[7];
    const float *const *A = (const float *const *)ptrs;
    const float *const *Wo = A + n_layers, *const *GU = Wo + n_layers, *const *D = GU + n_layers;
    float *const *K = (float *const *)(D + n_layers), *const *Vc = K + n_layers;
    const float *final_norm = (const float *)ptrs[6 * n_layers], *E = (const float *)ptrs[6 * n_layers + 1];
    float *scratch = (float *)ptrs[6 * n_layers + 2];
    const int nq = H * hd, nkv = Hkv * hd, nqk = nq + nkv, g = H / Hkv, S = L + 1;
    float *x = scratch, *h = x + d, *y = h + d, *a = y + nqk + nkv, *gu = a + nq, *s = gu + 2 * F;
    memcpy(x, emb_row, sizeof(float) * (size_t)d);
    for (int l = 0; l < n_layers; l++) {
        rms(x, h, d, eps);
        rows_times(h, A[l], y, d, nqk + nkv);
        for (int j = 0; j < nqk; j += 2) {  /* RoPE: (y_j + i·y_j+1) · (cos + i·sin) */
            const float re = y[j], im = y[j + 1], c = rot[j], sn = rot[j + 1];
            y[j] = re * c - im * sn;
            y[j + 1] = re * sn + im * c;
        }
        for (int kh = 0; kh < Hkv; kh++) {
            memcpy(K[l] + ((size_t)kh * P + L) * hd, y + nq + kh * hd, sizeof(float) * (size_t)hd);
            memcpy(Vc[l] + ((size_t)kh * P + L) * hd, y + nqk + kh * hd, sizeof(float) * (size_t)hd);
        }
        for (int qh = 0; qh < H; qh++) {
            const int kh = qh / g;
            const float *q = y + qh * hd, *Kh = K[l] + (size_t)kh * P * hd, *Vh = Vc[l] + (size_t)kh * P * hd;
            float m = -INFINITY;
            for (int t = 0; t < S; t++) {
                float dot = 0.0f;
                for (int i = 0; i < hd; i++) dot += q[i] * Kh[(size_t)t * hd + i];
                s[t] = dot;
                if (dot > m) m = dot;
            }
            float sum = 0.0f;
            for (int t = 0; t < S; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
            float *o = a + qh * hd;
            memset(o, 0, sizeof(float) * (size_t)hd);
            for (int t = 0; t < S; t++) {
                const float w = s[t] / sum;
                const float *v = Vh + (size_t)t * hd;
                for (int i = 0; i < hd; i++) o[i] += w * v[i];
            }
        }
        rows_times(a, Wo[l], h, nq, d);
        for (int i = 0; i < d; i++) x[i] += h[i];
        rms(x, h, d, eps);
        rows_times(h, GU[l], gu, d, 2 * F);
        for (int j = 0; j < F; j++) gu[j] = gu[j] * gu[F + j] / (1.0f + expf(gu[j]));  /* (−g)·u / (1 + e^{−g}) */
        rows_times(gu, D[l], h, F, d);
        for (int i = 0; i < d; i++) x[i] += h[i];
    }
    rms(x, h, d, eps);
    for (int i = 0; i < d; i++) h[i] *= final_norm[i];
    for (int v = 0; v < V; v++) {
        const float *e = E + (size_t)v * d;
        float dot = 0.0f;
        for (int i = 0; i < d; i++) dot += h[i] * e[i];
        logits[v] = dot;
    }
}
