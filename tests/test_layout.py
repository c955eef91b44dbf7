"""mrgfast.layout: the packed-stream layout types: Segments from cu_seqlens, device-only (static) Segments, and the
checks of an AttentionLayout of them. (Attention by these layouts: tests/models/test_attention.py.)"""

import pytest
import torch

from mrgfast.layout import AttentionLayout, Segments


def test_segments_from_cu_seqlens():
    seg = Segments.from_cu_seqlens(torch.tensor([0, 3, 3, 7], dtype=torch.int32), 7, "cpu")
    assert seg.bounds == [0, 3, 3, 7] and seg.lengths == [3, 0, 4] and seg.max_len == 4
    assert seg.cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to the number of tokens \(7\)"):
        Segments.from_cu_seqlens([0, 3, 6], 7, "cpu")


def test_static_segments_hold_no_host_bounds():
    # Rows of width 12 holding documents [5, 1, 6], [4, 0, 8] and [12], cu_seqlens padded to 9 documents.
    seg = Segments.static(torch.tensor([0, 5, 6, 12, 16, 16, 24, 36, 36, 36], dtype=torch.int32), 12)
    assert not seg.on_host and seg.cu_seqlens.shape == (10,)
    with pytest.raises(ValueError, match="no host-side document lengths"):
        seg.lengths
    with pytest.raises(ValueError, match="row width 12 cannot cover 30 tokens"):
        AttentionLayout.causal(seg).check(30)
