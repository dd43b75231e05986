"""The calibration's shape spread (compress/calibration.py spread / spread_line): recorded in the
.spfq file and printed by compress and inspect, so a user sees whether the calibration covers
the input shapes used at inference (README "Calibration coverage")."""

import torch

from spfq_deploy.compress.calibration import as_batches, spread, spread_line


def test_fixed_shape_is_one_shape():
    info = spread(as_batches(torch.zeros(70, 3, 8, 8), 32))
    assert info == {"samples": 70, "batches": 3, "inputs": {"input 0": {"distinct_shapes": 1, "shape": [3, 8, 8]}}}
    assert spread_line(info) == "70 samples in 3 batches; input 0 (3, 8, 8) every sample"


def test_sequence_lengths_min_median_max_weighted_by_samples():
    batches = [torch.ones(10, 3, dtype=torch.int64), torch.ones(1, 40, dtype=torch.int64),
               torch.ones(2, 256, dtype=torch.int64)]
    info = spread(batches)
    # 13 samples: ten of length 3, so the median is 3 (not the median of the three shapes, 40)
    assert info["inputs"]["input 0"] == {"distinct_shapes": 3, "axes_min_median_max": [[3, 3, 256]]}
    assert spread_line(info) == ("13 samples in 3 batches; input 0 per sample (3..3..256) "
                                 "(min..median..max over 3 shapes)")


def test_keyword_inputs_and_fixed_axes():
    batches = [{"ids": torch.ones(4, 5, dtype=torch.int64), "img": torch.zeros(4, 3, 16, 16)},
               {"ids": torch.ones(2, 9, dtype=torch.int64), "img": torch.zeros(2, 3, 32, 16)}]
    info = spread(as_batches(batches))
    assert info["inputs"]["ids"] == {"distinct_shapes": 2, "axes_min_median_max": [[5, 5, 9]]}
    assert info["inputs"]["img"] == {"distinct_shapes": 2, "axes_min_median_max": [[3, 3, 3], [16, 16, 32], [16, 16, 16]]}
    assert "img per sample (3, 16..16..32, 16)" in spread_line(info)
