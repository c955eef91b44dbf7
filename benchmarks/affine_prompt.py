"""Benchmark: MRG-LLM's conditional affine prompts spliced into the LLM input embeddings, forward + backward.

Sequence cases (seq_*): eager = einsum mix (book) + broadcast mul/add + torch.cat into the embedding sequence,
under autograd; fused_cat = mrgfast.ops.affine_prompt (auto), then the same torch.cat; mrgfast = affine_prompt
(auto) writing the prompts straight into the embedding buffer at their offset (no cat), and triton / cuda / cpu =
the same with that kernel forced. The step: look up the embeddings of the whole sequence (frozen table, placeholder
rows where the prompts go), build the sequence, backward a fixed gradient into P, gamma, beta and the mixing
weights. Op cases (op_*): the prompts alone, eager vs mrgfast (auto) and each kernel forced. `auto` runs what the
routing table (mrgfast/ops/routing.py) says for the case: its kernel or its torch path.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.variants import forced_backend, kernel_backends, with_routing
from mrgfast.ops.affine_prompt import IMPLEMENTED, affine_prompt, reference_affine_prompt, routing_case
from mrgfast.ops.backend import select_backend

NAME = "affine_prompt"
# (B, L, K, D, T): batch, prompt tokens, bank size (1 = prompt-wise), LLM width, sequence length.
FULL = dict(cases=[(16, 32, 1, 4096, 256), (8, 64, 1, 4096, 256), (16, 32, 8, 4096, 256), (8, 64, 8, 4096, 256)],
            warmup=2, repeats=11, deadline_s=None)
# The GPU sweep: MRG-LLM's training batch (32 images, 32 prompts, D=4096, banks of 1 and 8) first, then smaller
# batches, so that a run its deadline cuts short keeps the training size. deadline_s: no case after the first
# starts past it (seconds since the run opened), inside the GPU suite's 10 s box less start-up.
GPU = dict(cases=[(b, 32, k, 4096, 256) for b in (32, 16, 8, 4, 2, 1) for k in (1, 8)], warmup=5, repeats=20,
           deadline_s=5)
QUICK = dict(cases=[(b, 8, k, 512, 64) for b in (16, 4, 1) for k in (1, 4)], warmup=3, repeats=21, deadline_s=None)
VOCAB = 1000
OFFSET = 16  # prompts follow a short prefix (e.g. the BOS and instruction tokens)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # max |diff| relative to max |expected|


def make_inputs(batch, length, book, dim, rows, dtype, device):
    """Trainable P, gamma, beta, w (None prompt-wise), a frozen embedding table, token ids and a fixed grad."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    prompts = (rand(length, dim) if book == 1 else rand(book, length, dim)) * 0.02
    tensors = dict(prompts=prompts, gamma=rand(batch, dim) * 0.1, beta=rand(batch, dim) * 0.1,
                   weights=None if book == 1 else rand(batch, book).softmax(-1))
    tensors = {k: None if v is None else v.requires_grad_() for k, v in tensors.items()}
    table = rand(VOCAB, dim)
    ids = torch.randint(0, VOCAB, (batch, rows), generator=g).to(device)
    return tensors, table, ids, rand(batch, rows, dim)


def eager_sequence(tensors, table, ids, length):
    """What a user writes today: mix, modulate, and splice the prompts into the embeddings with torch.cat."""
    embeds = torch.nn.functional.embedding(ids, table)
    prompts = reference_affine_prompt(**tensors)
    return torch.cat([embeds[:, :OFFSET], prompts, embeds[:, OFFSET + length:]], dim=1)


def fused_sequence(tensors, table, ids, length):
    """The fused op (auto), spliced with the same torch.cat."""
    embeds = torch.nn.functional.embedding(ids, table)
    return torch.cat([embeds[:, :OFFSET], affine_prompt(**tensors), embeds[:, OFFSET + length:]], dim=1)


def in_place_sequence(backend):
    """The op under `backend` (None: auto) writing the prompts into the embedding buffer in place: no concatenation."""
    def build(tensors, table, ids, length):
        with forced_backend(backend):
            return affine_prompt(**tensors, out=torch.nn.functional.embedding(ids, table), offsets=OFFSET)
    return build


def prompts_only(backend):
    """The op alone under `backend` (None: auto): the [B, L, D] prompts."""
    def build(tensors):
        with forced_backend(backend):
            return affine_prompt(**tensors)
    return build


def sequence_variants(device) -> dict:
    """eager, fused_cat, the in-place op under auto ("mrgfast") and under each kernel backend forced."""
    return {"eager": eager_sequence, "fused_cat": fused_sequence, "mrgfast": in_place_sequence(None),
            **{b: in_place_sequence(b) for b in kernel_backends(IMPLEMENTED, device)}}


def check_agreement(variants, tensors, table, ids, grad, length, dtype) -> None:
    """Every variant's sequence and gradients against eager's on the same inputs; exit on a mismatch."""
    leaves = [t for t in tensors.values() if t is not None]
    results = {}
    for name, build in variants.items():
        seq = build(tensors, table, ids, length)
        results[name] = [seq.detach(), *torch.autograd.grad(seq, leaves, grad)]
    for name in list(variants)[1:]:
        for what, got, want in zip(["sequence", *tensors], results[name], results["eager"]):
            error = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
            if not error <= TOLERANCE[dtype]:
                sys.exit(f"{NAME}: {name} disagrees with eager on {what}: relative error {error:.3e}")


def clear_grads(leaves):
    """A reset that drops the leaves' gradients, so every step allocates its own."""
    def reset():
        for leaf in leaves:
            leaf.grad = None
    return reset


def measure_sequence(case, dtype, device, shape) -> dict:
    """Time and memory of the splicing variants for one (B, L, K, D, T) case; mrgfast (auto, in place) is the
    candidate."""
    batch, length, book, dim, rows = case
    tensors, table, ids, grad = make_inputs(batch, length, book, dim, rows, dtype, device)
    variants = sequence_variants(device)
    check_agreement(variants, tensors, table, ids, grad, length, dtype)
    leaves = [t for t in tensors.values() if t is not None]
    fns = {name: (lambda build=build: build(tensors, table, ids, length).backward(grad))
           for name, build in variants.items()}
    result = harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="eager",
                                  candidate="mrgfast", reset=clear_grads(leaves))
    medians = result["variants"]
    result["fused_cat_speed_ratio"] = medians["eager"]["median_ms"] / medians["fused_cat"]["median_ms"]
    result["fused_cat_memory_ratio"] = medians["fused_cat"]["peak_bytes"] / medians["eager"]["peak_bytes"]
    return with_routing(result, NAME, routing_case(book > 1, True), batch * length * dim, IMPLEMENTED, device)


def measure_op(case, dtype, device, shape) -> dict:
    """Time and memory of the prompts alone ([B, L, D], no splicing): the eager composition vs the op under auto and
    under each kernel forced."""
    batch, length, book, dim, _ = case
    tensors, _, _, grad = make_inputs(batch, length, book, dim, length, dtype, device)
    leaves = [t for t in tensors.values() if t is not None]
    builds = {"mrgfast": prompts_only(None), **{b: prompts_only(b) for b in kernel_backends(IMPLEMENTED, device)}}
    want = [reference_affine_prompt(**tensors), *torch.autograd.grad(reference_affine_prompt(**tensors), leaves, grad)]
    for name, build in builds.items():
        out = build(tensors)
        for got, expected in zip([out.detach(), *torch.autograd.grad(out, leaves, grad)], want):
            error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30))
            if not error.item() <= TOLERANCE[dtype]:
                sys.exit(f"{NAME}: op {name} disagrees with eager: relative error {error.item():.3e}")
    fns = {"eager": lambda: reference_affine_prompt(**tensors).backward(grad),
           **{name: (lambda build=build: build(tensors).backward(grad)) for name, build in builds.items()}}
    result = harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="eager",
                                  candidate="mrgfast", reset=clear_grads(leaves))
    return with_routing(result, NAME, routing_case(book > 1, False), batch * length * dim, IMPLEMENTED,
                        device)


def main() -> None:
    """Check the variants agree, then time and memory-profile them per case (until the deadline), writing the report
    after each."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL, GPU)
    shape, device, dtype = run.shape, run.device, run.dtype
    backend = select_backend("affine_prompt", torch.empty(0, device=device), IMPLEMENTED)
    config = {"cases": "B_L_K_D_T: batch, prompt tokens, bank size (1 = prompt-wise), LLM width, sequence length",
              "gamma_beta": "[B, D] (per image)", "prompt_offset": OFFSET, "warmup": shape["warmup"],
              "repeats": shape["repeats"], "mrgfast_backend": backend, "threads": torch.get_num_threads(),
              "step": "embeds = embedding(ids) (frozen); sequence with the prompts at rows OFFSET..OFFSET+L-1; "
                      "sequence.backward(g) into P, gamma, beta, w; mrgfast = auto (the routing table's choice), "
                      "triton / cuda / cpu = that kernel forced",
              "headline": "least favourable case: seq_* mrgfast (auto, in place) vs eager, op_* mrgfast vs eager; "
                          "fused_cat_* = the op (auto) + torch.cat"}
    cases = []
    for b, l, k, d, t in shape["cases"]:
        for label, measure in {f"seq_B{b}_L{l}_K{k}_D{d}_T{t}": measure_sequence,
                               f"op_B{b}_L{l}_K{k}_D{d}": measure_op}.items():
            cases.append((label, lambda label=label, measure=measure, case=(b, l, k, d, t):
                          {label: measure(case, dtype, device, shape)}))
    run.sweep(config, cases)


if __name__ == "__main__":
    main()
