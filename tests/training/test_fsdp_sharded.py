"""FSDP2 with sharded trainable weights (distributed.shard_trainable): how the rows are split, the setting's config
check, and save_adapter writing given full tensors. The 2-process runs are in
tests/integration/test_two_process_sharded.py."""

import pytest
import torch

from mrgfast.config import ConfigError, load_config
from mrgfast.training.fsdp import shard_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8, 9])
def test_shard_bounds_split_like_torch_chunk(size, world):
    """FSDP2 shards dim 0 with torch.chunk; shard_bounds gives every rank its rows, empty past the last chunk."""
    rows = torch.arange(size)
    chunks = list(torch.chunk(rows, world)) if size else []
    for rank in range(world):
        start, count = shard_bounds(size, world, rank)
        expected = chunks[rank] if rank < len(chunks) else rows[:0]
        assert torch.equal(rows[start:start + count], expected), (size, world, rank)


def test_shard_trainable_needs_fsdp():
    with pytest.raises(ConfigError, match=r"distributed.shard_trainable=true needs distributed.strategy=fsdp "
                                          r"\(got strategy='ddp'\)"):
        load_config(None, ["distributed.shard_trainable=true"])
    assert load_config(None, ["distributed.strategy=fsdp", "distributed.shard_trainable=true"]) \
        .distributed.shard_trainable
    assert not load_config(None, ["distributed.strategy=fsdp"]).distributed.shard_trainable


def test_save_adapter_writes_given_full_tensors(toy_model, tmp_path):
    """save_adapter(tensors=...) (how a sharded run writes gathered full copies) writes exactly those, in PEFT's
    format, and refuses tensors that do not fit the adapter."""
    from safetensors.torch import load_file

    from mrgfast.peft import LoraConfig, adapter_state_dict, apply_lora, save_adapter
    apply_lora(toy_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    given = {key: torch.full(t.shape, float(i)) for i, (key, t) in enumerate(adapter_state_dict(toy_model).items())}
    save_adapter(toy_model, tmp_path / "given", tensors=given)
    written = load_file(str(tmp_path / "given" / "adapter_model.safetensors"))
    assert written.keys() == given.keys() and all(torch.equal(written[k], given[k]) for k in given)
    save_adapter(toy_model, tmp_path / "live")
    assert (tmp_path / "given" / "adapter_config.json").read_text() == \
        (tmp_path / "live" / "adapter_config.json").read_text()
    first = next(iter(given))
    with pytest.raises(ValueError, match=r"save_adapter\(tensors=...\): the adapter's keys do not match"):
        save_adapter(toy_model, tmp_path / "bad", tensors={k: v for k, v in given.items() if k != first})
    with pytest.raises(ValueError, match=f"{first} has shape"):
        save_adapter(toy_model, tmp_path / "bad", tensors={**given, first: torch.zeros(1)})
