// spfq_tvm_ops.cc — the TVM packed functions of spfq-deploy, linked into every TVM-exported
// library (model.<target>.so) together with the C kernels (kernels/src/*.c).
//
// The Relax graph calls one destination-passing function per compressed layer:
//
//   R.call_dps_packed("spfq_packed_layer",
//                     (x, attrs, sign, mask, planes, scale, lam, bias), out_sinfo=y)
//
// x float32 (..., K) for linear, channels last (B, H, W, C) / (B, W, C) for conv (y likewise:
// the graph keeps activations channels last between convs); attrs int64 (kAttrs,) below;
// sign / mask uint64 (N, W), planes uint64 (bits, N, W or Wk) in the kernel ABI layouts
// (kernels/include/spfq_kernels.h); scale / lam / bias float32 (N,). A buffer the layout does
// not use (or lam / bias when absent) is a 1-element placeholder, flagged in attrs.
// Conv runs spfq_layer::conv_nhwc (1x1 convs: the GEMM on the pixels; depthwise / few-channel:
// direct kernels; KxK: spfq_conv_nhwc). clip_lo / clip_hi (float32 bit patterns) are an output
// clamp the graph fused in (a ReLU / ReLU6 / Clip after the layer), applied in the kernels'
// epilogue; (-inf, inf) when none.
//
// Weights are prepared (spfq_prepare: a copy / repack per conv group) on the first call and
// cached per (attrs, weight buffer) address: Relax constants do not move while the VM lives.
// Written against tvm-ffi's C ABI only (c_api.h: TVMFFIAny, the Tensor object layout), so the
// library depends on no C++ symbol of libtvm_ffi; the runtime that loads it provides the C ones.
//
// Extra exported functions (callable from Python as lib["spfq_tvm_calls"]() etc.):
//   spfq_tvm_calls()        -> int: kernel GEMM calls made so far (the "packed path is used" proof)
//   spfq_tvm_library_info() -> str: "spfq-tvm 1; kernels abi N isa NAME"

#include <tvm/ffi/c_api.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "spfq_kernels.h"
#include "spfq_layer.hpp"

namespace {

// attrs layout (int64); kVersion first so a mismatched library refuses instead of misreading
enum Attr {
    kVersion = 0, kLayout, kBits, kK, kN, kKeptWords, kInt8, kHasLam, kHasBias,
    kConvDims, kGroups, kKH, kKW, kSH, kSW, kPT, kPL, kPB, kPR, kDH, kDW, kClipLo, kClipHi, kGroupSize, kAttrs
};
const int64_t kAttrVersion = 3;  // 3: group_size (group-wise scales: scale / lam (N, ceil(K/G)))
enum Arg { aX = 0, aAttrs, aSign, aMask, aPlanes, aScale, aLam, aBias, aY, kArgs };

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::atomic<int64_t> g_calls{0};

using spfq_layer::default_threads;

using spfq_layer::check;

int64_t numel(const DLTensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

const DLTensor *tensor_arg(const TVMFFIAny *args, int i, DLDataTypeCode code, int bits, const char *name) {
    const TVMFFIAny &a = args[i];
    const DLTensor *t = nullptr;
    if (a.type_index == kTVMFFITensor) t = TVMFFITensorGetDLTensorPtr(a.v_obj);
    else if (a.type_index == kTVMFFIDLTensorPtr) t = static_cast<const DLTensor *>(a.v_ptr);
    else throw Error(std::string(name) + " is not a tensor (type index " + std::to_string(a.type_index) + ")");
    if (t->device.device_type != kDLCPU) throw Error(std::string(name) + " is not on the CPU");
    if (t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1)
        throw Error(std::string(name) + " has the wrong dtype");
    if (t->strides) {  // only compact row-major tensors
        int64_t expect = 1;
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (t->shape[d] != 1 && t->strides[d] != expect) throw Error(std::string(name) + " is not contiguous");
            expect *= t->shape[d];
        }
    }
    return t;
}

template <typename T>
const T *data(const DLTensor *t) {
    return reinterpret_cast<const T *>(static_cast<const char *>(t->data) + t->byte_offset);
}

// The prepared weights of one layer (one part per conv group, or the depthwise kernel).
struct Prepared {
    spfq_layer::Layer layer;
};

float float_attr(int64_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits);
    float v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}

spfq_layer::ConvGeometry geometry(const int64_t *at) {
    return {at[kKH], at[kKW], at[kSH], at[kSW], at[kDH], at[kDW], at[kPT], at[kPL], at[kPB], at[kPR]};
}

using Key = std::tuple<const void *, const void *, const void *, const void *, const void *, const void *,
                       const void *>;
std::mutex g_mu;
std::map<Key, Prepared> g_cache;  // lives as long as the process (constants do too)

const Prepared &prepare(const int64_t *at, const DLTensor *sign_t, const DLTensor *mask_t, const DLTensor *planes_t,
                        const DLTensor *scale_t, const DLTensor *lam_t, const DLTensor *bias_t) {
    const uint64_t *sign = data<uint64_t>(sign_t), *mask = data<uint64_t>(mask_t), *planes = data<uint64_t>(planes_t);
    const float *scale = data<float>(scale_t);
    const float *lam = at[kHasLam] ? data<float>(lam_t) : nullptr;
    const float *bias = at[kHasBias] ? data<float>(bias_t) : nullptr;
    Key key{at, sign, mask, planes, scale, lam, bias};
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_cache.find(key);
    if (it != g_cache.end()) return it->second;

    const int layout = static_cast<int>(at[kLayout]), bits = static_cast<int>(at[kBits]);
    const int64_t n = at[kN], k = at[kK], kw = at[kKeptWords], g = at[kConvDims] ? at[kGroups] : 1;
    const int64_t W = (k + 63) / 64, ng = n / g;
    const int64_t pw = layout == SPFQ_SPARSE ? kw : W;
    const bool need_sign = spfq_layer::needs_sign(layout), need_mask = spfq_layer::needs_mask(layout);
    const bool need_planes = spfq_layer::needs_planes(layout);
    if (need_sign && numel(sign_t) != n * W) throw Error("sign has the wrong size");
    if (need_mask && numel(mask_t) != n * W) throw Error("mask has the wrong size");
    // pw == 0 (an all-zero sparse layer): a 1-element placeholder stands for the empty buffer
    if (need_planes && numel(planes_t) != (pw ? bits * n * pw : 1)) throw Error("planes has the wrong size");
    const int64_t group = at[kGroupSize];
    if (group < 0) throw Error("group_size must be >= 0");
    const int64_t per = group ? n * ((k + group - 1) / group) : n;  // scale / lam values
    if (numel(scale_t) != per || (lam && numel(lam_t) != per) || (bias && numel(bias_t) != n))
        throw Error("scale / lam / bias have the wrong number of elements");

    Prepared prep;
    const spfq_layer::ConvGeometry G = geometry(at);
    if (group)
        prep.layer = spfq_layer::prepare_grouped_layer(layout, bits, n, k, kw, group, g, need_sign ? sign : nullptr,
                                                       need_mask ? mask : nullptr, need_planes ? planes : nullptr,
                                                       scale, lam, bias);
    else
        prep.layer = spfq_layer::prepare_layer(layout, bits, n, k, kw, g, at[kConvDims] ? &G : nullptr, at[kInt8] != 0,
                                               need_sign ? sign : nullptr, need_mask ? mask : nullptr,
                                               need_planes ? planes : nullptr, scale, lam, bias);
    try {
        spfq_layer::set_clamp(prep.layer, float_attr(at[kClipLo]), float_attr(at[kClipHi]));
    } catch (...) {
        spfq_layer::free_layer(prep.layer);
        throw;
    }
    return g_cache.emplace(key, std::move(prep)).first->second;
}

// Counts kernel calls (the test that the packed kernels are the compiled path reads it).
void gemm(spfq_prepared *p, bool int8, int64_t m, int64_t k, const float *rows, float *y, int threads) {
    if (m > 0) g_calls.fetch_add(1, std::memory_order_relaxed);
    spfq_layer::gemm(p, int8, m, k, rows, y, threads);
}

void run_linear(const int64_t *at, const Prepared &prep, const DLTensor *x, DLTensor *y, int threads) {
    const int64_t k = at[kK], n = at[kN];
    if (x->ndim < 1 || x->shape[x->ndim - 1] != k) throw Error("input's last axis must be in_features");
    const int64_t m = numel(x) / k;
    if (numel(y) != m * n) throw Error("output has the wrong size");
    float *out = static_cast<float *>(y->data) + y->byte_offset / 4;
    if (!prep.layer.gparts.empty()) {
        if (m > 0) g_calls.fetch_add(1, std::memory_order_relaxed);
        spfq_layer::gemm_part(prep.layer, 0, at[kInt8] != 0, m, k, data<float>(x), out, threads);
        return;
    }
    gemm(prep.layer.parts[0], at[kInt8] != 0, m, k, data<float>(x), out, threads);
}

void run_conv(const int64_t *at, const Prepared &prep, const DLTensor *xt, DLTensor *yt, int threads) {
    const int64_t dims = at[kConvDims], k = at[kK], n = at[kN], groups = at[kGroups];
    if (xt->ndim != dims + 2) throw Error("conv input has the wrong rank");
    // channels last: (B, H, W, C) or (B, W, C)
    const int64_t B = xt->shape[0], C = xt->shape[dims + 1], H = dims == 2 ? xt->shape[1] : 1, Wd = xt->shape[dims];
    const spfq_layer::ConvGeometry G = geometry(at);
    const int64_t cg = k / (G.KH * G.KW);
    if (C != cg * groups) throw Error("conv input has the wrong number of channels");
    const int64_t OH = G.out_h(H), OW = G.out_w(Wd);
    if (OH < 1 || OW < 1) throw Error("conv input is smaller than the kernel");
    if (numel(yt) != B * n * OH * OW) throw Error("conv output has the wrong size");
    if (B * OH * OW > 0)  // one GEMM per group, or one direct-kernel call
        g_calls.fetch_add(prep.layer.dw || prep.layer.dc ? 1 : groups, std::memory_order_relaxed);
    spfq_layer::conv_nhwc(prep.layer, at[kInt8] != 0, k, n, groups, G, data<float>(xt), B, C, H, Wd,
                          static_cast<float *>(yt->data) + yt->byte_offset / 4, threads);
}

void packed_layer(const TVMFFIAny *args, int32_t num_args) {
    if (num_args != kArgs) throw Error("expected " + std::to_string(kArgs) + " arguments, got " + std::to_string(num_args));
    const DLTensor *attrs = tensor_arg(args, aAttrs, kDLInt, 64, "attrs");
    if (numel(attrs) != kAttrs) throw Error("attrs has the wrong size");
    const int64_t *at = data<int64_t>(attrs);
    if (at[kVersion] != kAttrVersion) throw Error("attrs version mismatch (library and graph from different releases)");
    const int layout = static_cast<int>(at[kLayout]);
    if (layout < SPFQ_SIGN || layout > SPFQ_SPARSE) throw Error("unknown layout");
    if (at[kK] < 1 || at[kN] < 1) throw Error("in_features and out_features must be positive");
    if (at[kConvDims] && (at[kGroups] < 1 || at[kN] % at[kGroups] || at[kK] % (at[kKH] * at[kKW])))
        throw Error("inconsistent conv attributes");
    const DLTensor *x = tensor_arg(args, aX, kDLFloat, 32, "x");
    const DLTensor *sign = tensor_arg(args, aSign, kDLUInt, 64, "sign");
    const DLTensor *mask = tensor_arg(args, aMask, kDLUInt, 64, "mask");
    const DLTensor *planes = tensor_arg(args, aPlanes, kDLUInt, 64, "planes");
    const DLTensor *scale = tensor_arg(args, aScale, kDLFloat, 32, "scale");
    const DLTensor *lam = tensor_arg(args, aLam, kDLFloat, 32, "lam");
    const DLTensor *bias = tensor_arg(args, aBias, kDLFloat, 32, "bias");
    DLTensor *y = const_cast<DLTensor *>(tensor_arg(args, aY, kDLFloat, 32, "y"));
    const Prepared &prep = prepare(at, sign, mask, planes, scale, lam, bias);
    static const int threads = default_threads();
    if (at[kConvDims]) run_conv(at, prep, x, y, threads);
    else run_linear(at, prep, x, y, threads);
}

}  // namespace

extern "C" {

TVM_FFI_DLL_EXPORT int __tvm_ffi_spfq_packed_layer(void *, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result) {
    try {
        packed_layer(args, num_args);
        result->type_index = kTVMFFINone;
        result->zero_padding = 0;
        result->v_int64 = 0;
        return 0;
    } catch (const std::exception &e) {
        TVMFFIErrorSetRaisedFromCStr("ValueError", (std::string("spfq_packed_layer: ") + e.what()).c_str());
        return -1;
    }
}

TVM_FFI_DLL_EXPORT int __tvm_ffi_spfq_tvm_calls(void *, const TVMFFIAny *, int32_t, TVMFFIAny *result) {
    result->type_index = kTVMFFIInt;
    result->zero_padding = 0;
    result->v_int64 = g_calls.load();
    return 0;
}

TVM_FFI_DLL_EXPORT int __tvm_ffi_spfq_tvm_library_info(void *, const TVMFFIAny *, int32_t, TVMFFIAny *result) {
    static const std::string info = "spfq-tvm 1; kernels abi " + std::to_string(spfq_abi_version()) + " isa " + spfq_isa();
    TVMFFIByteArray bytes{info.data(), info.size()};
    return TVMFFIStringFromByteArray(&bytes, result);
}

}  // extern "C"
