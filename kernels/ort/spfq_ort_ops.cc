// spfq_ort_ops.cc — the ONNX Runtime custom-op library of spfq-deploy (domain "ai.spfq", v1).
//
// Two operators run the packed .spfq weights through the same C kernels as the Python binding
// (kernels/include/spfq_kernels.h, linked statically into this library), and a third, MaxPool,
// pools channels-last activations between them (see PoolKernel):
//
//   PackedMatMul(X[..., K], sign?, mask?, planes?, scale[N], lam?, bias?) -> Y[..., N]
//   PackedConv  (X[B, C, (H,) W], same weight inputs, Xq?, Xs?)           -> Y? | Yq?, Ys?
//
// sign/mask are uint64 (N, W) and planes uint64 (bits, N, W or Wk) in the kernel ABI layouts
// (W = ceil(K / 64) little-endian words per row). Attributes: layout (1 sign, 2 sign_mask,
// 3 planes, 4 sparse), bits, in_features (K = C/group * prod(kernel_shape) for conv),
// out_features (N), kept_words, activation ("float": weight-only, or "int8": activations
// quantised per row, exact int32 sums), threads (0: SPFQ_NUM_THREADS or all cores);
// PackedConv also kernel_shape, strides, pads (begins then ends), dilations, group, and
// channels_last (0: X / Y are NCHW as ONNX Conv; 1: X[B, (H,) W, C] -> Y[B, (OH,) OW, N], the
// layout the export keeps between consecutive compressed convs). Conv runs spfq_layer.hpp's
// conv / conv_nhwc: direct depthwise kernels, 1x1 convs as a GEMM on NHWC pixels, others
// through im2col rows, as spfq_deploy/kernel_layers.py does. Both ops take clip_min / clip_max
// (floats, default -inf / inf): a ReLU / ReLU6 / Clip fused into the kernels' epilogue, and
// fused_activation ("hardswish", "silu" or "prelu" with prelu_slope: out_features floats), applied
// after the clamp to each block of outputs while it is in cache (kernels/src/act.c).
// Both take group_size (default 0): > 0, scale and lam are (N, ceil(K / group_size)), one per
// (output row, group of group_size columns of K), run by spfq_grouped_* (the float order of
// spfq_kernels.h; convs through im2col rows, float edges only).
// Channels-last PackedConv may exchange int8 tensors with its neighbours (export/onnx/q8.py):
// X absent and Xq (int8, NHWC) + Xs (float, one scale per pixel) given (1x1 int8 layers);
// q8_output = 1: outputs Yq + Ys instead of Y, quantised per pixel as the next (1x1 int8) layer
// would (1x1 int8 and depthwise layers; spfq_layer.hpp conv_nhwc_act).
//
// Built against the oldest ONNX Runtime C API it supports (the headers it is compiled with, e.g.
// Debian's libonnxruntime-dev 1.21 = API 21); newer runtimes keep serving that API version.
// Errors (shape mismatch, bad attribute) come back as ORT status messages, never as crashes.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "spfq_kernels.h"
#include "spfq_layer.hpp"

#define SPFQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

const char *const kDomain = "ai.spfq";
// X (float) or Xq (int8) + Xs (float, one scale per row / pixel): exactly one form is given.
enum Input { kX = 0, kSign, kMask, kPlanes, kScale, kLam, kBias, kXq, kXs, kInputs };
// Y (float), or Yq (int8) + Ys (float) when the node's q8_output attribute is 1.
enum Output { kY = 0, kYq, kYs, kOutputs };

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::string shape_str(const std::vector<int64_t> &s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); i++) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + ")";
}

using spfq_layer::default_threads;


// One kernel instance: attributes, and the prepared weights (one per conv group) built on the
// first run from the constant initializers and rebuilt only if the weight buffers change.
class PackedKernel {
  public:
    PackedKernel(const OrtKernelInfo *info, bool conv) : conv_(conv) {
        Ort::ConstKernelInfo ki(info);
        layout_ = static_cast<int>(ki.GetAttribute<int64_t>("layout"));
        bits_ = static_cast<int>(ki.GetAttribute<int64_t>("bits"));
        k_ = ki.GetAttribute<int64_t>("in_features");
        n_ = ki.GetAttribute<int64_t>("out_features");
        kept_words_ = attr_or(ki, "kept_words", 0);
        group_size_ = attr_or(ki, "group_size", 0);
        if (group_size_ < 0) throw Error("group_size must be >= 0");
        std::string act = ki.GetAttribute<std::string>("activation");
        if (act != "float" && act != "int8") throw Error("activation must be 'float' or 'int8', got '" + act + "'");
        int8_ = act == "int8";
        q8_out_ = attr_or(ki, "q8_output", 0) != 0;
        threads_ = static_cast<int>(attr_or(ki, "threads", 0));
        clip_lo_ = fattr_or(ki, "clip_min", -INFINITY);
        clip_hi_ = fattr_or(ki, "clip_max", INFINITY);
        if (!(clip_lo_ <= clip_hi_)) throw Error("clip_min must not exceed clip_max");
        const std::string fused = sattr_or(ki, "fused_activation", "");
        if (fused == "hardswish") act_ = SPFQ_ACT_HARDSWISH;
        else if (fused == "silu") act_ = SPFQ_ACT_SILU;
        else if (fused == "prelu") act_ = SPFQ_ACT_PRELU;
        else if (!fused.empty()) throw Error("fused_activation must be hardswish, silu or prelu, got '" + fused + "'");
        if (act_ == SPFQ_ACT_PRELU) {
            act_slope_ = ki.GetAttributes<float>("prelu_slope");
            if (static_cast<int64_t>(act_slope_.size()) != n_)
                throw Error("prelu_slope must hold out_features values");
        }
        if (threads_ <= 0) threads_ = default_threads();
        if (layout_ < SPFQ_SIGN || layout_ > SPFQ_SPARSE) throw Error("unknown layout " + std::to_string(layout_));
        if (k_ < 1 || n_ < 1) throw Error("in_features and out_features must be positive");
        if (conv_) {
            kshape_ = ki.GetAttributes<int64_t>("kernel_shape");
            size_t d = kshape_.size();
            if (d < 1 || d > 2) throw Error("PackedConv supports 1-D and 2-D convolution");
            strides_ = ki.GetAttributes<int64_t>("strides");
            pads_ = ki.GetAttributes<int64_t>("pads");
            dil_ = ki.GetAttributes<int64_t>("dilations");
            groups_ = ki.GetAttribute<int64_t>("group");
            channels_last_ = attr_or(ki, "channels_last", 0) != 0;
            if (strides_.size() != d || dil_.size() != d || pads_.size() != 2 * d)
                throw Error("strides / dilations / pads do not match kernel_shape");
            if (groups_ < 1 || n_ % groups_) throw Error("out_features must be a multiple of group");
            int64_t taps = 1;
            for (int64_t v : kshape_) taps *= v;
            if (k_ % taps) throw Error("in_features must be channels per group x prod(kernel_shape)");
        }
    }

    ~PackedKernel() { release(); }

    OrtStatusPtr ComputeV2(OrtKernelContext *context) {
        try {
            Ort::KernelContext ctx(context);
            prepare(ctx);
            if (conv_) run_conv(ctx);
            else run_linear(ctx);
            return nullptr;
        } catch (const std::exception &e) {
            std::string msg = std::string(conv_ ? "ai.spfq.PackedConv" : "ai.spfq.PackedMatMul") + ": " + e.what();
            return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
        }
    }

  private:
    static int64_t attr_or(Ort::ConstKernelInfo &ki, const char *name, int64_t dflt) {
        try {
            return ki.GetAttribute<int64_t>(name);
        } catch (const Ort::Exception &) {
            return dflt;
        }
    }

    static std::string sattr_or(Ort::ConstKernelInfo &ki, const char *name, const char *dflt) {
        try {
            return ki.GetAttribute<std::string>(name);
        } catch (const Ort::Exception &) {
            return dflt;
        }
    }

    static float fattr_or(Ort::ConstKernelInfo &ki, const char *name, float dflt) {
        try {
            return ki.GetAttribute<float>(name);
        } catch (const Ort::Exception &) {
            return dflt;
        }
    }

    void release() { spfq_layer::free_layer(layer_); }

    // Typed view of an optional input: nullptr when absent (or empty); checks the shape.
    template <typename T>
    const T *input(Ort::KernelContext &ctx, int index, const std::vector<int64_t> &shape, const char *name) {
        Ort::ConstValue v = ctx.GetInput(index);
        present_[index] = static_cast<const OrtValue *>(v) != nullptr;
        if (!present_[index]) return nullptr;
        auto info = v.GetTensorTypeAndShapeInfo();
        std::vector<int64_t> got = info.GetShape();
        if (got != shape) throw Error(std::string(name) + " has shape " + shape_str(got) + ", expected " + shape_str(shape));
        return v.GetTensorData<T>();
    }

    void prepare(Ort::KernelContext &ctx) {
        std::lock_guard<std::mutex> lock(mu_);
        const int64_t W = (k_ + 63) / 64;
        const uint64_t *sign = input<uint64_t>(ctx, kSign, {n_, W}, "sign");
        const uint64_t *mask = input<uint64_t>(ctx, kMask, {n_, W}, "mask");
        const int64_t pw = layout_ == SPFQ_SPARSE ? kept_words_ : W;
        const uint64_t *planes = input<uint64_t>(ctx, kPlanes, {bits_, n_, pw}, "planes");
        const std::vector<int64_t> sshape = group_size_ ? std::vector<int64_t>{n_, (k_ + group_size_ - 1) / group_size_}
                                                        : std::vector<int64_t>{n_};
        const float *scale = input<float>(ctx, kScale, sshape, "scale");
        const float *lam = input<float>(ctx, kLam, sshape, "lam");
        const float *bias = input<float>(ctx, kBias, {n_}, "bias");
        const void *key[] = {sign, mask, planes, scale, lam, bias};
        if ((layer_.dw || layer_.dc || !layer_.gparts.empty() || !layer_.parts.empty()) && std::equal(key, key + 6, key_))
            return;
        if (!scale) throw Error("scale is required");
        using namespace spfq_layer;
        if ((needs_sign(layout_) && !present_[kSign]) || (needs_mask(layout_) && !present_[kMask]) ||
            (needs_planes(layout_) && !present_[kPlanes]))
            throw Error("a packed weight input required by layout " + std::to_string(layout_) + " is missing");
        release();
        spfq_layer::ConvGeometry G{};
        if (conv_) G = geometry();
        if (group_size_)
            layer_ = spfq_layer::prepare_grouped_layer(layout_, bits_, n_, k_, kept_words_, group_size_,
                                                       conv_ ? groups_ : 1, sign, mask, planes, scale, lam, bias);
        else
            layer_ = spfq_layer::prepare_layer(layout_, bits_, n_, k_, kept_words_, groups_, conv_ ? &G : nullptr,
                                               int8_, sign, mask, planes, scale, lam, bias);
        spfq_layer::set_clamp(layer_, clip_lo_, clip_hi_);
        spfq_layer::set_activation(layer_, act_, act_slope_.empty() ? nullptr : act_slope_.data(), n_);
        std::copy(key, key + 6, key_);
    }

    void run_linear(Ort::KernelContext &ctx) {
        Ort::ConstValue xv = ctx.GetInput(kX);
        if (static_cast<const OrtValue *>(xv) == nullptr) throw Error("X is required");
        std::vector<int64_t> shape = xv.GetTensorTypeAndShapeInfo().GetShape();
        if (shape.empty() || shape.back() != k_)
            throw Error("input has shape " + shape_str(shape) + ", the last axis must be " + std::to_string(k_));
        int64_t m = 1;
        for (size_t i = 0; i + 1 < shape.size(); i++) m *= shape[i];
        shape.back() = n_;
        float *y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
        if (q8_out_) throw Error("PackedMatMul takes float activations in and out");
        spfq_layer::gemm_part(layer_, 0, int8_, m, k_, xv.GetTensorData<float>(), y, threads_);
    }

    // The conv attributes as a 2-D geometry (1-D: height 1).
    spfq_layer::ConvGeometry geometry() const {
        const size_t d = kshape_.size();
        return {d == 2 ? kshape_[0] : 1, kshape_[d - 1], d == 2 ? strides_[0] : 1, strides_[d - 1],
                d == 2 ? dil_[0] : 1,    dil_[d - 1],    d == 2 ? pads_[0] : 0,    pads_[d - 1],
                d == 2 ? pads_[d] : 0,   pads_[2 * d - 1]};
    }
    void run_conv(Ort::KernelContext &ctx) {
        Ort::ConstValue xv = ctx.GetInput(kX);
        const bool q8_in = static_cast<const OrtValue *>(xv) == nullptr;
        if (q8_in) xv = ctx.GetInput(kXq);
        if (static_cast<const OrtValue *>(xv) == nullptr) throw Error("neither X nor Xq is given");
        std::vector<int64_t> s = xv.GetTensorTypeAndShapeInfo().GetShape();
        const size_t d = kshape_.size();
        if (s.size() != d + 2) throw Error("input has shape " + shape_str(s) + ", expected rank " + std::to_string(d + 2));
        // treat 1-D as 2-D with height 1
        const bool cl = channels_last_;
        const int64_t B = s[0], C = cl ? s[d + 1] : s[1], H = d == 2 ? s[cl ? 1 : 2] : 1, Wd = s[cl ? d : d + 1];
        const spfq_layer::ConvGeometry G = geometry();
        const int64_t cg = k_ / (G.KH * G.KW);
        if (C != cg * groups_)
            throw Error("input has " + std::to_string(C) + " channels, expected " + std::to_string(cg * groups_));
        const int64_t OH = G.out_h(H), OW = G.out_w(Wd);
        if (OH < 1 || OW < 1) throw Error("input " + shape_str(s) + " is smaller than the kernel");
        std::vector<int64_t> oshape = d == 2 ? std::vector<int64_t>{B, n_, OH, OW} : std::vector<int64_t>{B, n_, OW};
        if (cl) oshape = d == 2 ? std::vector<int64_t>{B, OH, OW, n_} : std::vector<int64_t>{B, OW, n_};
        if (!cl) {  // NCHW: float in and out
            if (q8_in || q8_out_) throw Error("int8 tensors in or out need channels_last=1");
            float *y = ctx.GetOutput(kY, oshape).GetTensorMutableData<float>();
            spfq_layer::conv(layer_, int8_, k_, n_, groups_, G, xv.GetTensorData<float>(), B, C, H, Wd, y, threads_);
            return;
        }
        spfq_act a{};
        if (q8_in) {
            a.xq = xv.GetTensorData<int8_t>();
            a.xscale = input<float>(ctx, kXs, std::vector<int64_t>(s.begin(), s.end() - 1), "Xs");
            if (!a.xscale) throw Error("Xq is given without Xs");
        } else {
            a.x = xv.GetTensorData<float>();
        }
        if (q8_out_) {
            a.yq = ctx.GetOutput(kYq, oshape).GetTensorMutableData<int8_t>();
            a.yscale = ctx.GetOutput(kYs, std::vector<int64_t>(oshape.begin(), oshape.end() - 1))
                           .GetTensorMutableData<float>();
        } else {
            a.y = ctx.GetOutput(kY, oshape).GetTensorMutableData<float>();
        }
        spfq_layer::conv_nhwc_act(layer_, int8_, k_, n_, groups_, G, a, B, C, H, Wd, threads_);
    }

    bool conv_;
    int layout_ = 0, bits_ = 0, threads_ = 1;
    bool int8_ = false, channels_last_ = false, q8_out_ = false;
    float clip_lo_ = -INFINITY, clip_hi_ = INFINITY;
    int32_t act_ = SPFQ_ACT_NONE;     // fused_activation (after the clamp)
    std::vector<float> act_slope_;    // prelu_slope: one per output channel
    int64_t k_ = 0, n_ = 0, kept_words_ = 0, groups_ = 1, group_size_ = 0;
    std::vector<int64_t> kshape_, strides_, pads_, dil_;
    std::mutex mu_;
    const void *key_[6] = {};
    bool present_[kInputs] = {};
    spfq_layer::Layer layer_;
};

template <bool Conv>
struct PackedOp : Ort::CustomOpBase<PackedOp<Conv>, PackedKernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi &api, const OrtKernelInfo *info, void **kernel) const {
        try {
            *kernel = new PackedKernel(info, Conv);
            return nullptr;
        } catch (const std::exception &e) {
            std::string msg = std::string("ai.spfq.") + GetName() + ": " + e.what();
            return api.CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str());
        }
    }
    const char *GetName() const { return Conv ? "PackedConv" : "PackedMatMul"; }
    size_t GetInputTypeCount() const { return kInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const {
        return (i >= kSign && i <= kPlanes) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64
             : i == kXq ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
        return i == kScale ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return kOutputs; }
    ONNXTensorElementDataType GetOutputType(size_t i) const {
        return i == kYq ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_OPTIONAL; }
};

// MaxPool(X[B, H, W, C]) -> Y[B, OH, OW, C]: ONNX MaxPool (2-D, ceil_mode 0) with channels last,
// what export/onnx/layout.py puts between compressed convs instead of Transpose, MaxPool,
// Transpose. Attributes as ONNX's: kernel_shape, strides, pads, dilations.
class PoolKernel {
  public:
    explicit PoolKernel(const OrtKernelInfo *info) {
        Ort::ConstKernelInfo ki(info);
        k_ = ki.GetAttributes<int64_t>("kernel_shape");
        if (k_.size() != 2) throw Error("MaxPool supports 2-D pooling");
        s_ = ints_or(ki, "strides", {1, 1});
        d_ = ints_or(ki, "dilations", {1, 1});
        p_ = ints_or(ki, "pads", {0, 0, 0, 0});
        if (s_.size() != 2 || d_.size() != 2 || p_.size() != 4) throw Error("strides / dilations / pads do not match kernel_shape");
        threads_ = default_threads();
    }

    OrtStatusPtr ComputeV2(OrtKernelContext *context) {
        try {
            Ort::KernelContext ctx(context);
            Ort::ConstValue xv = ctx.GetInput(0);
            std::vector<int64_t> s = xv.GetTensorTypeAndShapeInfo().GetShape();
            if (s.size() != 4) throw Error("input has shape " + shape_str(s) + ", expected (B, H, W, C)");
            const int64_t OH = (s[1] + p_[0] + p_[2] - d_[0] * (k_[0] - 1) - 1) / s_[0] + 1;
            const int64_t OW = (s[2] + p_[1] + p_[3] - d_[1] * (k_[1] - 1) - 1) / s_[1] + 1;
            if (OH < 1 || OW < 1) throw Error("input " + shape_str(s) + " is smaller than the window");
            for (int64_t v : {s[0], s[1], s[2], s[3], OH, OW})
                if (v > INT32_MAX) throw Error("input too large");
            auto i32 = [](int64_t v) { return static_cast<int32_t>(v); };
            const spfq_conv_geom g{i32(s[3]), i32(s[3]), i32(k_[0]), i32(k_[1]), i32(s_[0]), i32(s_[1]),
                                   i32(d_[0]), i32(d_[1]), i32(p_[0]), i32(p_[1]), i32(p_[2]), i32(p_[3])};
            float *y = ctx.GetOutput(0, {s[0], OH, OW, s[3]}).GetTensorMutableData<float>();
            spfq_layer::check(spfq_maxpool_nhwc(&g, i32(s[0]), i32(s[1]), i32(s[2]), i32(OH), i32(OW),
                                                xv.GetTensorData<float>(), y, threads_), "maxpool_nhwc");
            return nullptr;
        } catch (const std::exception &e) {
            return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (std::string("ai.spfq.MaxPool: ") + e.what()).c_str());
        }
    }

  private:
    static std::vector<int64_t> ints_or(Ort::ConstKernelInfo &ki, const char *name, std::vector<int64_t> dflt) {
        try {
            return ki.GetAttributes<int64_t>(name);
        } catch (const Ort::Exception &) {
            return dflt;
        }
    }
    std::vector<int64_t> k_, s_, d_, p_;
    int threads_ = 1;
};

struct PoolOp : Ort::CustomOpBase<PoolOp, PoolKernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi &api, const OrtKernelInfo *info, void **kernel) const {
        try {
            *kernel = new PoolKernel(info);
            return nullptr;
        } catch (const std::exception &e) {
            return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("ai.spfq.MaxPool: ") + e.what()).c_str());
        }
    }
    const char *GetName() const { return "MaxPool"; }
    size_t GetInputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

PackedOp<false> g_matmul;
PackedOp<true> g_conv;
PoolOp g_pool;
std::mutex g_domains_mu;
std::vector<Ort::CustomOpDomain> g_domains;  // must outlive every session that uses them

}  // namespace

// "ai.spfq 1; ort-api <N>; kernels abi <N> isa <name>": what this library is, for manifests.
SPFQ_EXPORT const char *SpfqOrtLibraryInfo(void) {
    static std::string info = std::string(kDomain) + " 1; ort-api " + std::to_string(ORT_API_VERSION) +
                              "; kernels abi " + std::to_string(spfq_abi_version()) + " isa " + spfq_isa();
    return info.c_str();
}

// The entry point SessionOptions.register_custom_ops_library() calls.
SPFQ_EXPORT OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
    const OrtApi *api = api_base ? api_base->GetApi(ORT_API_VERSION) : nullptr;
    if (!api) {
        std::fprintf(stderr, "spfq custom ops: this ONNX Runtime (%s) is older than the C API %d the library was built "
                             "against\n", api_base ? api_base->GetVersionString() : "?", ORT_API_VERSION);
        return nullptr;  // cannot build an OrtStatus without the API; sessions will name the missing ops
    }
    Ort::InitApi(api);
    try {
        Ort::CustomOpDomain domain(kDomain);
        domain.Add(&g_matmul);
        domain.Add(&g_conv);
        domain.Add(&g_pool);
        Ort::UnownedSessionOptions(options).Add(domain);
        std::lock_guard<std::mutex> lock(g_domains_mu);
        g_domains.push_back(std::move(domain));
    } catch (const std::exception &e) {
        return api->CreateStatus(ORT_FAIL, e.what());
    }
    return nullptr;
}
