"""UHR recommendations: patch size keeps the 1K token grid, the time shift follows the paper."""

from __future__ import annotations

import pytest

from l2p.sample import recommended_patch_size, recommended_shift


@pytest.mark.parametrize("side,patch", [(512, 16), (1024, 16), (2048, 32), (4096, 64), (8192, 128)])
def test_patch_keeps_4096_tokens(side, patch):
    assert recommended_patch_size(side, side) == patch
    assert (side // patch) ** 2 <= 4096


def test_shift_anchors():
    assert recommended_shift(1024, 1024) == pytest.approx(3.0)
    assert recommended_shift(512, 512) == pytest.approx(3.0)
    assert 4.0 <= recommended_shift(4096, 4096, 64) <= 5.0  # the paper's best at 4K
    assert recommended_shift(4096, 4096) == pytest.approx(4.5)
    s2k, s8k = recommended_shift(2048, 2048), recommended_shift(8192, 8192)
    assert 3.0 < s2k < 4.5 < s8k
    assert recommended_shift(4096, 4096, base_shift=1.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="multiple of the patch size 64"):
        recommended_shift(4000, 4096, 64)
