"""mrgfast.data.static_dpo: shared-prompt DPO batches at a run-wide static shape: the bounds hold for the run's pairs,
two batches of different pair counts and layouts share one graph signature, the padded pieces (documents, key gathers,
answer tokens, pair slots, reference log-probs) add nothing, and batches over the limits or of the padded layout
raise. (The step on these batches equals the eager one: tests/train/test_static_dpo.py.)"""

import copy

import pytest
import torch

from mrgfast.assemble import build_all
from mrgfast.data.packing import IGNORE_INDEX
from mrgfast.data.static_dpo import StaticDPOShape, make_static_dpo, padded_pair_values, slotted_answer_bounds
from mrgfast.training.cuda_graph import signature
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import host_batches, tiny


@pytest.fixture(scope="module")
def dpo_pieces(cache, tmp_path_factory):
    """The tiny DPO run's pieces: two rows of pairs per batch, unshuffled."""
    out = tmp_path_factory.mktemp("dpo")
    return build_all(tiny(cache, out, "mode=dpo", "data.shuffle=false", "data.rows=2"), torch.device("cpu"))


def run_shape(pieces) -> StaticDPOShape:
    """The run's static DPO shape, as train() builds it for CUDA graphs."""
    return StaticDPOShape.for_lengths(pieces.packed.lengths, pieces.packed.budget, pieces.packed.rows)


def test_static_dpo_batches_share_one_signature_and_pad_with_nothing(dpo_pieces):
    shape = run_shape(dpo_pieces)
    batches, _ = host_batches(dpo_pieces, 2)
    pairs = [(b.dpo_cu_seqlens.numel() - 1) // 2 for b in batches]
    assert pairs[1] < pairs[0] <= shape.max_pairs  # one batch leaves pair slots empty
    assert signature(batches[0]) != signature(batches[1])
    static = [make_static_dpo(copy.deepcopy(b), shape) for b in batches]
    assert signature(static[0]) == signature(static[1])  # one captured graph replays both
    for host, batch, count in zip(batches, static, pairs):
        assert not batch.layout.seg_q.on_host and not batch.layout.seg_k.on_host
        assert batch.layout.kv_index.shape == (shape.max_keys,) and batch.dpo_index.shape == (shape.max_answer_tokens,)
        assert batch.dpo_pair_mask.tolist() == [i < count for i in range(shape.max_pairs)]
        # Padded documents are empty; the answers keep their lengths at the front of the chosen and rejected slots.
        real = len(host.layout.seg_q.bounds)
        bounds = batch.layout.seg_q.cu_seqlens.tolist()
        assert bounds[:real] == host.layout.seg_q.bounds and set(bounds[real:]) == {host.input_ids.numel()}
        lengths = batch.dpo_cu_seqlens.diff().tolist()
        host_lengths = host.dpo_cu_seqlens.diff().tolist()
        empty = [0] * (shape.max_pairs - count)
        assert lengths == host_lengths[:count] + empty + host_lengths[count:] + empty
        answers = host.dpo_index.numel()
        assert set(batch.dpo_labels[answers:].tolist()) == {IGNORE_INDEX}
        assert int(batch.dpo_cu_seqlens[-1]) == answers  # padded answer tokens lie past the last answer
        assert batch.pixel_values.shape[0] == shape.max_samples


def test_bounds_hold_for_the_shortest_pairs():
    shape = StaticDPOShape.for_lengths([10, 12, 40], budget=64, rows=2)
    # Six 10-token pairs fit a 64-token row: 6 pair slots, 2 x 6 documents + 1 padding tail per row.
    assert (shape.max_pairs, shape.max_documents) == (12, 26)
    assert shape.max_keys > 2 * 64  # longer than the token stream: attention tells gathered keys by that
    with pytest.raises(ValueError, match="needs the dataset's pair lengths"):
        StaticDPOShape.for_lengths([], budget=64, rows=2)


def test_pair_slots_pad_answers_and_reference_logps():
    bounds = torch.tensor([0, 3, 5, 9, 10], dtype=torch.int32)  # chosen 3, 2; rejected 4, 1
    assert slotted_answer_bounds(bounds, 2, 3).tolist() == [0, 3, 5, 5, 9, 10, 10]
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    assert padded_pair_values(logps, 3).tolist() == [-1.0, -2.0, 0.0, -3.0, -4.0, 0.0]


def test_limits_and_other_layouts_raise(dpo_pieces, cache, tmp_path):
    (batch,), _ = host_batches(dpo_pieces, 1)
    shape = run_shape(dpo_pieces)
    for field, name in (("max_pairs", "pairs"), ("max_documents", "attention documents"),
                        ("max_keys", "gathered keys"), ("max_answer_tokens", "scored answer tokens")):
        small = StaticDPOShape(**{**vars(shape), field: 1})
        with pytest.raises(ValueError, match=f"{name}, more than {field}=1 of its static DPO shape"):
            make_static_dpo(batch, small)
    padded = build_all(tiny(cache, tmp_path, "mode=dpo", "dpo.layout=padded"), torch.device("cpu"))
    (trl_batch,), _ = host_batches(padded, 1)
    with pytest.raises(ValueError, match="need DPOCollator's shared layout"):
        make_static_dpo(trl_batch, shape)
