"""model.init_from in a run: a tiny PeFoMed run starts from a MiniGPT-v2 stage-3 checkpoint, and its resume restores
its own checkpoint without reading init_from again."""

import os
import signal

import pytest
import torch

from mrgfast.assemble import build_all
from mrgfast.peft import adapter_state_dict
from mrgfast.train import train
from tests.minigptv2_files import lora_key, minigptv2_state, pefomed_config, save_minigptv2
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import logged, trained_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_pefomed_run_starts_from_minigptv2_and_resumes_without_it(cache, tmp_path):
    state = minigptv2_state()
    path = save_minigptv2(tmp_path / "minigptv2_checkpoint.pth", state)
    common = [f"model.init_from={path}", "schedule.max_steps=4", "optim.lr=1e-2", "lora.lora_dropout=0.1"]
    model = build_all(pefomed_config(cache, tmp_path / "x", *common), torch.device("cpu")).model
    projector, adapter = model.adapters["image"], adapter_state_dict(model.decoder)
    assert torch.equal(projector.proj.weight, state["llama_proj.weight"])
    assert torch.equal(projector.proj.bias, state["llama_proj.bias"])
    assert torch.equal(projector.norm.weight, torch.ones(32)) and torch.equal(projector.norm.bias, torch.zeros(32))
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            for part in "AB":
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"
                assert torch.equal(adapter[key], state[lora_key(layer, module, part)])

    straight = train(pefomed_config(cache, tmp_path / "a", *common))

    def stop_at_two(step, outputs):
        """Send this process a real SIGTERM after step 2."""
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(pefomed_config(cache, tmp_path / "b", *common), on_step=stop_at_two)
    assert first.stopped_early and first.step == 2
    path.unlink()  # a resume restores its own checkpoint: init_from is not read again
    resumed = train(pefomed_config(cache, tmp_path / "b", *common, "resume=auto"))
    assert resumed.step == 4
    assert [r["loss"] for r in logged(tmp_path / "b")] == [r["loss"] for r in logged(tmp_path / "a")]
    a, b = trained_tensors(straight.checkpoint), trained_tensors(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["adapters.image.proj.weight"], state["llama_proj.weight"])  # it did train
    with pytest.raises(ValueError, match="minigptv2_checkpoint.pth"):  # a new run does read it
        train(pefomed_config(cache, tmp_path / "c", *common))
