// spfq_layer.hpp — one compressed Linear / Conv layer on top of the C kernels, for the C++ runtime
// wrappers (kernels/ort/spfq_ort_ops.cc, kernels/tvm/spfq_tvm_ops.cc). Header-only so each
// wrapper keeps its own build; the logic lives here once:
//   prepare_groups: spfq_prepare per conv group (rows r0..r0+ng of the packed buffers; a group's
//                   planes are copied to a contiguous (bits, ng, words) slab);
//   gemm:           float (weight-only) or int8 (per-row quantised activations) through one part;
//   conv:           im2col per group (rows (b, oh, ow), columns (c, kh, kw) as PyTorch flattens the
//                   weight), the GEMM, and the (pixel, channel) -> (channel, pixel) scatter;
//                   depthwise layers (one input channel per group: k = KH * KW) instead run
//                   the direct kernel spfq_dwconv, few-channel convs (one group, <= 4 input
//                   channels: a first conv) spfq_dconv, both bit-identical with that path's C
//                   oracle (the few-channel one always weight-only float);
//   conv_nhwc:      the same with channels last (x (B, H, W, C) -> y (B, OH, OW, N)), the layout
//                   activations keep between compressed convs: a 1x1 stride-1 conv is the GEMM on
//                   the input itself, other one-group convs run spfq_conv_nhwc (im2col rows made
//                   per block in cache), grouped ones gather their im2col rows from NHWC, depthwise
//                   layers run spfq_dwconv_nhwc; outputs are bit-identical with conv's, transposed;
//   Layer:          what a wrapper holds per layer (prepare_layer / free_layer).
// Errors are thrown as std::runtime_error with a one-line message.
#ifndef SPFQ_LAYER_HPP
#define SPFQ_LAYER_HPP

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "spfq_kernels.h"

namespace spfq_layer {

inline void check(int status, const char *what) {
    static const char *names[] = {"ok", "invalid argument", "out of memory", "not supported"};
    if (status)
        throw std::runtime_error(std::string(what) + ": kernel returned " + (status < 4 ? names[status] : "error"));
}

// Kernel threads per call: SPFQ_NUM_THREADS, else every hardware thread.
inline int default_threads() {
    if (const char *env = std::getenv("SPFQ_NUM_THREADS")) {
        int v = std::atoi(env);
        if (v > 0) return v;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw ? static_cast<int>(hw) : 1;
}

inline bool needs_sign(int layout) { return layout == SPFQ_SIGN || layout == SPFQ_SIGN_MASK; }
inline bool needs_mask(int layout) { return layout == SPFQ_SIGN_MASK || layout == SPFQ_SPARSE; }
inline bool needs_planes(int layout) { return layout == SPFQ_PLANES || layout == SPFQ_SPARSE; }

inline void free_parts(std::vector<spfq_prepared *> &parts) {
    for (spfq_prepared *p : parts) spfq_free(p);
    parts.clear();
}

// The scalar fields of a weights desc (its buffers are set by the caller).
inline spfq_weights_desc make_desc(int layout, int bits, int64_t n, int64_t k, int64_t kept_words) {
    spfq_weights_desc d{};
    d.layout = layout;
    d.n = static_cast<int32_t>(n);
    d.k = static_cast<int32_t>(k);
    d.bits = bits;
    d.kept_words = static_cast<int32_t>(kept_words);
    return d;
}

// The weights desc of each conv group j (rows [j n/groups, (j+1) n/groups)) handed to fn(d);
// scale and lam hold scale_cols floats per row (1, or ceil(k / group) for group-wise scales).
// Bit planes of several groups are copied into one slab, valid during fn.
template <class Fn>
inline void each_group_desc(int layout, int bits, int64_t n, int64_t k, int64_t kept_words, int64_t groups,
                            int64_t scale_cols, const uint64_t *sign, const uint64_t *mask, const uint64_t *planes,
                            const float *scale, const float *lam, const float *bias, Fn &&fn) {
    const int64_t W = (k + 63) / 64, ng = n / groups;
    const int64_t pw = layout == SPFQ_SPARSE ? kept_words : W;
    std::vector<uint64_t> slab;
    for (int64_t j = 0; j < groups; j++) {
        const int64_t r0 = j * ng;
        spfq_weights_desc d = make_desc(layout, bits, ng, k, kept_words);
        d.sign = needs_sign(layout) && sign ? sign + r0 * W : nullptr;
        d.mask = needs_mask(layout) && mask ? mask + r0 * W : nullptr;
        if (needs_planes(layout) && planes) {
            if (groups == 1) {
                d.planes = planes;
            } else {
                slab.resize(static_cast<size_t>(bits * ng * pw));
                for (int64_t b = 0; b < bits; b++)
                    std::memcpy(&slab[b * ng * pw], planes + (b * n + r0) * pw, sizeof(uint64_t) * ng * pw);
                d.planes = slab.data();
            }
        }
        d.scale = scale + r0 * scale_cols;
        d.lam = lam ? lam + r0 * scale_cols : nullptr;
        d.bias = bias ? bias + r0 : nullptr;
        fn(d);
    }
}

// One prepared part per group; buffers the layout does not use are ignored.
inline std::vector<spfq_prepared *> prepare_groups(int layout, int bits, int64_t n, int64_t k, int64_t kept_words,
                                                   int64_t groups, const uint64_t *sign, const uint64_t *mask,
                                                   const uint64_t *planes, const float *scale, const float *lam,
                                                   const float *bias) {
    std::vector<spfq_prepared *> parts;
    try {
        each_group_desc(layout, bits, n, k, kept_words, groups, 1, sign, mask, planes, scale, lam, bias,
                        [&](const spfq_weights_desc &d) {
                            spfq_prepared *p = nullptr;
                            check(spfq_prepare(&d, &p), "prepare");
                            parts.push_back(p);
                        });
    } catch (...) {
        free_parts(parts);
        throw;
    }
    return parts;
}

// 2-D convolution geometry (1-D: height 1, KH = SH = DH = 1, PT = PB = 0).
struct ConvGeometry {
    int64_t KH, KW, SH, SW, DH, DW, PT, PL, PB, PR;
    int64_t out_h(int64_t H) const { return (H + PT + PB - DH * (KH - 1) - 1) / SH + 1; }
    int64_t out_w(int64_t Wd) const { return (Wd + PL + PR - DW * (KW - 1) - 1) / SW + 1; }
};

// One input channel per group (depthwise, or a conv on a 1-channel input): the direct kernel.
inline bool is_depthwise(int64_t k, const ConvGeometry &G) { return k == G.KH * G.KW; }

// One group over at most 4 input channels with a kernel larger than 1x1 (a first conv on an RGB
// or grey image): the direct few-channel kernel spfq_dconv (spfq_deploy.kernels.is_few_channel).
inline bool is_few_channel(int64_t k, int64_t groups, const ConvGeometry &G) {
    const int64_t taps = G.KH * G.KW;
    return groups == 1 && taps > 1 && taps <= 64 && k % taps == 0 && k / taps <= 4;
}

// A prepared layer: one GEMM part per conv group, or a direct kernel (depthwise, few-channel).
struct Layer {
    std::vector<spfq_prepared *> parts;
    spfq_dw *dw = nullptr;
    spfq_dc *dc = nullptr;
    std::vector<spfq_grouped *> gparts;  // group-wise scales (spfq_grouped_*): one per conv group, instead of parts
};

// The output clamp fused into every kernel of the layer (ReLU / ReLU6 / Clip after it).
inline void set_clamp(Layer &l, float lo, float hi) {
    for (spfq_prepared *p : l.parts) check(spfq_set_clamp(p, lo, hi), "set_clamp");
    if (l.dw) check(spfq_dw_set_clamp(l.dw, lo, hi), "set_clamp");
    if (l.dc) check(spfq_dc_set_clamp(l.dc, lo, hi), "set_clamp");
    for (spfq_grouped *p : l.gparts) check(spfq_grouped_set_clamp(p, lo, hi), "set_clamp");
}

// The activation fused after the clamp (HardSwish / SiLU / PReLU after the layer): slope holds one
// PReLU slope per output channel (n of them; a conv group's part takes its slice), else null.
inline void set_activation(Layer &l, int32_t kind, const float *slope, int64_t n) {
    const size_t parts = l.parts.size();
    for (size_t g = 0; g < parts; g++)
        check(spfq_set_activation(l.parts[g], kind, slope ? slope + static_cast<int64_t>(g) * (n / static_cast<int64_t>(parts)) : nullptr),
              "set_activation");
    if (l.dw) check(spfq_dw_set_activation(l.dw, kind, slope), "set_activation");
    if (l.dc) check(spfq_dc_set_activation(l.dc, kind, slope), "set_activation");
    const size_t gp = l.gparts.size();
    for (size_t g = 0; g < gp; g++)
        check(spfq_grouped_set_activation(l.gparts[g], kind, slope ? slope + static_cast<int64_t>(g) * (n / static_cast<int64_t>(gp)) : nullptr),
              "set_activation");
}

inline void free_layer(Layer &l) {
    free_parts(l.parts);
    spfq_dw_free(l.dw);
    l.dw = nullptr;
    spfq_dc_free(l.dc);
    l.dc = nullptr;
    for (spfq_grouped *p : l.gparts) spfq_grouped_free(p);
    l.gparts.clear();
}

// A layer with group-wise scales (scale and lam hold (n, ceil(k / group)) floats): one
// spfq_grouped per conv group (groups = 1 for a linear layer), rows sliced as prepare_groups
// does; convs then always run the im2col GEMM path (no direct kernels: they take per-row scales).
inline Layer prepare_grouped_layer(int layout, int bits, int64_t n, int64_t k, int64_t kept_words, int64_t group,
                                   int64_t groups, const uint64_t *sign, const uint64_t *mask, const uint64_t *planes,
                                   const float *scale, const float *lam, const float *bias) {
    Layer l;
    try {
        each_group_desc(layout, bits, n, k, kept_words, groups, (k + group - 1) / group, sign, mask, planes, scale, lam,
                        bias, [&](const spfq_weights_desc &d) {
                            spfq_grouped *p = nullptr;
                            check(spfq_grouped_prepare(&d, static_cast<int32_t>(group), &p), "grouped_prepare");
                            l.gparts.push_back(p);
                        });
    } catch (...) {
        free_layer(l);
        throw;
    }
    return l;
}

// y (m, n) = rows (m, k) through a layer with group-wise scales.
inline void gemm_grouped(spfq_grouped *p, bool int8, int64_t m, const float *rows, float *y, int threads) {
    if (m == 0) return;
    if (m > INT32_MAX) throw std::runtime_error("too many rows");
    if (int8) check(spfq_grouped_matmul_q8(p, static_cast<int32_t>(m), rows, y, threads), "grouped_matmul_q8");
    else check(spfq_grouped_matmul_f32(p, static_cast<int32_t>(m), rows, y, threads), "grouped_matmul_f32");
}

// The layer's kernels: G is null for a linear layer. Buffers the layout does not use are ignored.
// A few-channel conv takes its direct kernel when it runs weight-only (int8 false), as
// kernels.layer_activation exports it; asked for int8, it stays on the im2col GEMM path.
inline Layer prepare_layer(int layout, int bits, int64_t n, int64_t k, int64_t kept_words, int64_t groups,
                           const ConvGeometry *G, bool int8, const uint64_t *sign, const uint64_t *mask,
                           const uint64_t *planes, const float *scale, const float *lam, const float *bias) {
    Layer l;
    const bool few = G && !int8 && is_few_channel(k, groups, *G);
    if (G && (few || is_depthwise(k, *G))) {
        spfq_weights_desc d = make_desc(layout, bits, n, k, kept_words);
        d.sign = needs_sign(layout) ? sign : nullptr;
        d.mask = needs_mask(layout) ? mask : nullptr;
        d.planes = needs_planes(layout) ? planes : nullptr;
        d.scale = scale;
        d.lam = lam;
        d.bias = bias;
        auto i32 = [](int64_t v) { return static_cast<int32_t>(v); };
        if (few) {
            spfq_conv_geom g{i32(k / (G->KH * G->KW)), i32(n), i32(G->KH), i32(G->KW), i32(G->SH), i32(G->SW),
                           i32(G->DH), i32(G->DW), i32(G->PT), i32(G->PL), i32(G->PB), i32(G->PR)};
            check(spfq_dc_prepare(&d, &g, &l.dc), "prepare few-channel conv");
            return l;
        }
        spfq_dw_geom g{i32(groups), i32(n / groups), i32(G->KH), i32(G->KW), i32(G->SH), i32(G->SW),
                       i32(G->DH), i32(G->DW), i32(G->PT), i32(G->PL), i32(G->PB), i32(G->PR)};
        check(spfq_dw_prepare(&d, &g, &l.dw), "prepare depthwise");
        return l;
    }
    l.parts = prepare_groups(layout, bits, n, k, kept_words, G ? groups : 1, sign, mask, planes, scale, lam, bias);
    return l;
}

// y (m, ng) = rows (m, k) through one prepared part.
inline void gemm(spfq_prepared *p, bool int8, int64_t m, int64_t k, const float *rows, float *y, int threads) {
    if (m == 0) return;
    if (m > INT32_MAX) throw std::runtime_error("too many rows");
    if (!int8) {
        check(spfq_matmul_f32(p, static_cast<int32_t>(m), rows, y, threads), "matmul_f32");
        return;
    }
    check(spfq_matmul_q8(p, static_cast<int32_t>(m), rows, y, threads), "matmul_q8");
}

// Part g (a conv group) of a layer, per-row or group-wise scales.
inline void gemm_part(const Layer &layer, size_t g, bool int8, int64_t m, int64_t k, const float *rows, float *y,
                      int threads) {
    if (!layer.gparts.empty()) gemm_grouped(layer.gparts[g], int8, m, rows, y, threads);
    else gemm(layer.parts[g], int8, m, k, rows, y, threads);
}

// y (B, n, OH, OW) = conv(x (B, C, H, Wd)) with k = C / groups * KH * KW inputs per output.
inline void conv(const Layer &layer, bool int8, int64_t k, int64_t n, int64_t groups, const ConvGeometry &G,
                 const float *x, int64_t B, int64_t C, int64_t H, int64_t Wd, float *y, int threads) {
    if (layer.dc) {  // weight-only float (kernels.layer_activation)
        if (B > INT32_MAX || H > INT32_MAX || Wd > INT32_MAX) throw std::runtime_error("conv input too large");
        check(spfq_dconv(layer.dc, 0, static_cast<int32_t>(B), static_cast<int32_t>(H), static_cast<int32_t>(Wd), x, y,
                         threads), "dconv");
        return;
    }
    if (layer.dw) {
        if (B > INT32_MAX || H > INT32_MAX || Wd > INT32_MAX) throw std::runtime_error("conv input too large");
        check(spfq_dwconv(layer.dw, int8, static_cast<int32_t>(B), static_cast<int32_t>(H), static_cast<int32_t>(Wd),
                          x, y, threads), "dwconv");
        return;
    }
    const std::vector<spfq_prepared *> &parts = layer.parts;
    const int64_t OH = G.out_h(H), OW = G.out_w(Wd), cg = C / groups;
    const int64_t m = B * OH * OW, ng = n / groups, P = OH * OW;
    thread_local std::vector<float> cols, yg;  // per thread, reused across calls
    if (cols.size() < static_cast<size_t>(m * k)) cols.resize(static_cast<size_t>(m * k));
    if (yg.size() < static_cast<size_t>(m * ng)) yg.resize(static_cast<size_t>(m * ng));
    for (int64_t g = 0; g < groups; g++) {
        float *row = cols.data();
        for (int64_t b = 0; b < B; b++)
            for (int64_t oh = 0; oh < OH; oh++)
                for (int64_t ow = 0; ow < OW; ow++) {
                    const int64_t ih0 = oh * G.SH - G.PT, iw0 = ow * G.SW - G.PL;
                    if (ih0 >= 0 && ih0 + (G.KH - 1) * G.DH < H && iw0 >= 0 && iw0 + (G.KW - 1) * G.DW < Wd) {
                        for (int64_t c = 0; c < cg; c++) {  // patch inside the image: no bounds checks
                            const float *src = x + ((b * C + g * cg + c) * H + ih0) * Wd + iw0;
                            for (int64_t kh = 0; kh < G.KH; kh++, src += G.DH * Wd)
                                for (int64_t kw = 0; kw < G.KW; kw++) *row++ = src[kw * G.DW];
                        }
                        continue;
                    }
                    for (int64_t c = 0; c < cg; c++) {
                        const float *plane = x + ((b * C + g * cg + c) * H) * Wd;
                        for (int64_t kh = 0; kh < G.KH; kh++) {
                            const int64_t ih = ih0 + kh * G.DH;
                            for (int64_t kw = 0; kw < G.KW; kw++) {
                                const int64_t iw = iw0 + kw * G.DW;
                                *row++ = (ih >= 0 && ih < H && iw >= 0 && iw < Wd) ? plane[ih * Wd + iw] : 0.0f;
                            }
                        }
                    }
                }
        gemm_part(layer, static_cast<size_t>(g), int8, m, k, cols.data(), yg.data(), threads);
        for (int64_t b = 0; b < B; b++)  // (pixel, channel) -> (channel, pixel): read rows in order
            for (int64_t p = 0; p < P; p++) {
                const float *src = &yg[static_cast<size_t>((b * P + p) * ng)];
                float *out = y + (b * n + g * ng) * P + p;
                for (int64_t j = 0; j < ng; j++) out[j * P] = src[j];
            }
    }
}

// y (B, OH, OW, n) = conv(x (B, H, Wd, C)): the same rows and GEMMs as conv, channels last.
inline void conv_nhwc(const Layer &layer, bool int8, int64_t k, int64_t n, int64_t groups, const ConvGeometry &G,
                      const float *x, int64_t B, int64_t C, int64_t H, int64_t Wd, float *y, int threads) {
    if (layer.dc) {
        if (B > INT32_MAX || H > INT32_MAX || Wd > INT32_MAX) throw std::runtime_error("conv input too large");
        check(spfq_dconv(layer.dc, 1, static_cast<int32_t>(B), static_cast<int32_t>(H), static_cast<int32_t>(Wd), x, y,
                         threads), "dconv");
        return;
    }
    if (layer.dw) {
        if (B > INT32_MAX || H > INT32_MAX || Wd > INT32_MAX) throw std::runtime_error("conv input too large");
        check(spfq_dwconv_nhwc(layer.dw, int8, static_cast<int32_t>(B), static_cast<int32_t>(H),
                               static_cast<int32_t>(Wd), x, y, threads), "dwconv_nhwc");
        return;
    }
    const int64_t OH = G.out_h(H), OW = G.out_w(Wd), cg = C / groups;
    const int64_t m = B * OH * OW, ng = n / groups;
    const bool pointwise = G.KH == 1 && G.KW == 1 && G.SH == 1 && G.SW == 1 && G.PT == 0 && G.PL == 0 &&
                           G.PB == 0 && G.PR == 0;
    if (pointwise && groups == 1) {  // the input pixels are the GEMM rows
        gemm_part(layer, 0, int8, m, k, x, y, threads);
        return;
    }
    if (groups == 1 && layer.gparts.empty()) {  // im2col rows made per block inside the kernel library
        if (B > INT32_MAX || H > INT32_MAX || Wd > INT32_MAX) throw std::runtime_error("conv input too large");
        auto i32 = [](int64_t v) { return static_cast<int32_t>(v); };
        const spfq_conv_geom g{i32(C), i32(n), i32(G.KH), i32(G.KW), i32(G.SH), i32(G.SW),
                               i32(G.DH), i32(G.DW), i32(G.PT), i32(G.PL), i32(G.PB), i32(G.PR)};
        check(spfq_conv_nhwc(layer.parts[0], &g, int8, i32(B), i32(H), i32(Wd), x, y, threads), "conv_nhwc");
        return;
    }
    thread_local std::vector<float> cols, yg;  // per thread, reused across calls
    if (cols.size() < static_cast<size_t>(m * k)) cols.resize(static_cast<size_t>(m * k));
    if (groups > 1 && yg.size() < static_cast<size_t>(m * ng)) yg.resize(static_cast<size_t>(m * ng));
    const int64_t taps = G.KH * G.KW;
    for (int64_t g = 0; g < groups; g++) {
        float *row = cols.data();
        for (int64_t b = 0; b < B; b++)
            for (int64_t oh = 0; oh < OH; oh++)
                for (int64_t ow = 0; ow < OW; ow++, row += k)
                    for (int64_t kh = 0; kh < G.KH; kh++) {  // columns (c, kh, kw), as PyTorch flattens the weight
                        const int64_t ih = oh * G.SH - G.PT + kh * G.DH;
                        for (int64_t kw = 0; kw < G.KW; kw++) {
                            const int64_t iw = ow * G.SW - G.PL + kw * G.DW, t = kh * G.KW + kw;
                            if (ih < 0 || ih >= H || iw < 0 || iw >= Wd) {
                                for (int64_t c = 0; c < cg; c++) row[c * taps + t] = 0.0f;
                                continue;
                            }
                            const float *px = x + ((b * H + ih) * Wd + iw) * C + g * cg;
                            for (int64_t c = 0; c < cg; c++) row[c * taps + t] = px[c];
                        }
                    }
        if (groups == 1) {
            gemm_part(layer, 0, int8, m, k, cols.data(), y, threads);
            return;
        }
        gemm_part(layer, static_cast<size_t>(g), int8, m, k, cols.data(), yg.data(), threads);
        for (int64_t r = 0; r < m; r++) std::memcpy(y + r * n + g * ng, &yg[static_cast<size_t>(r * ng)], sizeof(float) * ng);
    }
}

inline bool is_pointwise(const ConvGeometry &G) {
    return G.KH == 1 && G.KW == 1 && G.SH == 1 && G.SW == 1 && G.PT == 0 && G.PL == 0 && G.PB == 0 && G.PR == 0;
}

// Channels-last conv whose input or output may be int8 with one scale per pixel (spfq_act: the
// next layer's per-row quantisation done in this layer's epilogue, export/onnx/q8.py; graph edges
// between compressed layers then carry int8). int8 in: 1x1 int8 convs (spfq_matmul_act); int8
// out: those and depthwise convs (spfq_dwconv_nhwc_act, weight-only float); any layer with float
// in and out.
inline void conv_nhwc_act(const Layer &layer, bool int8, int64_t k, int64_t n, int64_t groups, const ConvGeometry &G,
                          const spfq_act &a, int64_t B, int64_t C, int64_t H, int64_t Wd, int threads) {
    if (B > INT32_MAX || H > INT32_MAX || Wd > INT32_MAX) throw std::runtime_error("conv input too large");
    if (layer.dw && a.x && a.yq) {
        check(spfq_dwconv_nhwc_act(layer.dw, 0, static_cast<int32_t>(B), static_cast<int32_t>(H),
                                   static_cast<int32_t>(Wd), &a, threads), "dwconv_nhwc_act");
        return;
    }
    const int64_t m = B * G.out_h(H) * G.out_w(Wd);
    if (int8 && !layer.dw && !layer.dc && layer.gparts.empty() && groups == 1 && is_pointwise(G)) {
        if (m > INT32_MAX) throw std::runtime_error("too many rows");
        check(spfq_matmul_act(layer.parts[0], static_cast<int32_t>(m), &a, threads), "matmul_act");
        return;
    }
    if (!a.x || !a.y) throw std::runtime_error("int8 tensors in or out need a 1x1 int8 conv (or int8 out of a depthwise one)");
    conv_nhwc(layer, int8, k, n, groups, G, a.x, B, C, H, Wd, a.y, threads);
}

}  // namespace spfq_layer

#endif  // SPFQ_LAYER_HPP
