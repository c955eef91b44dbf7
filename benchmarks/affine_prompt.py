"""Benchmark: MRG-LLM's conditional affine prompts spliced into the LLM input embeddings, forward + backward.

Sequence cases (seq_*): eager = einsum mix (book) + broadcast mul/add + torch.cat into the embedding sequence,
under autograd; fused = mrgfast.ops.affine_prompt, then the same torch.cat; fused_out = affine_prompt writing
the prompts straight into the embedding buffer at their offset (no cat). The step: look up the embeddings of
the whole sequence (frozen table, placeholder rows where the prompts go), build the sequence, backward a fixed
gradient into P, gamma, beta and the mixing weights. Op cases (op_*): the prompts alone, eager vs fused.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from mrgfast.ops.affine_prompt import IMPLEMENTED, affine_prompt, reference_affine_prompt
from mrgfast.ops.backend import select_backend

NAME = "affine_prompt"
# (B, L, K, D, T): batch, prompt tokens, bank size (1 = prompt-wise), LLM width, sequence length.
FULL = dict(cases=[(16, 32, 1, 4096, 256), (8, 64, 1, 4096, 256), (16, 32, 8, 4096, 256), (8, 64, 8, 4096, 256)],
            warmup=2, repeats=11)
QUICK = dict(cases=[(4, 8, 1, 512, 64), (4, 8, 4, 512, 64)], warmup=3, repeats=21)
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
    """The fused op, spliced with the same torch.cat."""
    embeds = torch.nn.functional.embedding(ids, table)
    return torch.cat([embeds[:, :OFFSET], affine_prompt(**tensors), embeds[:, OFFSET + length:]], dim=1)


def fused_out_sequence(tensors, table, ids, length):
    """The fused op writing the prompts into the embedding buffer in place: no concatenation."""
    return affine_prompt(**tensors, out=torch.nn.functional.embedding(ids, table), offsets=OFFSET)


VARIANTS = {"eager": eager_sequence, "fused": fused_sequence, "fused_out": fused_out_sequence}


def check_agreement(tensors, table, ids, grad, length, dtype) -> None:
    """Every variant's sequence and gradients against eager's on the same inputs; exit on a mismatch."""
    leaves = [t for t in tensors.values() if t is not None]
    results = {}
    for name, build in VARIANTS.items():
        seq = build(tensors, table, ids, length)
        results[name] = [seq.detach(), *torch.autograd.grad(seq, leaves, grad)]
    for name in ("fused", "fused_out"):
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
    """Time and memory of the three splicing variants for one (B, L, K, D, T) case; fused_out is the candidate."""
    batch, length, book, dim, rows = case
    tensors, table, ids, grad = make_inputs(batch, length, book, dim, rows, dtype, device)
    check_agreement(tensors, table, ids, grad, length, dtype)
    leaves = [t for t in tensors.values() if t is not None]
    fns = {name: (lambda build=build: build(tensors, table, ids, length).backward(grad))
           for name, build in VARIANTS.items()}
    result = harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="eager",
                                  candidate="fused_out", reset=clear_grads(leaves))
    variants = result["variants"]
    result["fused_cat_speed_ratio"] = variants["eager"]["median_ms"] / variants["fused"]["median_ms"]
    result["fused_cat_memory_ratio"] = variants["fused"]["peak_bytes"] / variants["eager"]["peak_bytes"]
    return result


def measure_op(case, dtype, device, shape) -> dict:
    """Time and memory of the prompts alone ([B, L, D], no splicing): eager composition vs the fused op."""
    batch, length, book, dim, _ = case
    tensors, _, _, grad = make_inputs(batch, length, book, dim, length, dtype, device)
    leaves = [t for t in tensors.values() if t is not None]
    fns = {"eager": lambda: reference_affine_prompt(**tensors).backward(grad),
           "fused": lambda: affine_prompt(**tensors).backward(grad)}
    return harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="eager",
                                candidate="fused", reset=clear_grads(leaves))


def main() -> None:
    """Check the variants agree, then time and memory-profile them per case."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    shape, device, dtype = run.shape, run.device, run.dtype
    backend = select_backend("affine_prompt", torch.empty(0, device=device), IMPLEMENTED)
    results = {}
    for b, l, k, d, t in shape["cases"]:
        results[f"seq_B{b}_L{l}_K{k}_D{d}_T{t}"] = measure_sequence((b, l, k, d, t), dtype, device, shape)
        results[f"op_B{b}_L{l}_K{k}_D{d}"] = measure_op((b, l, k, d, t), dtype, device, shape)
    run.report({"cases": "B_L_K_D_T: batch, prompt tokens, bank size (1 = prompt-wise), LLM width, sequence length",
                "gamma_beta": "[B, D] (per image)", "prompt_offset": OFFSET, "warmup": shape["warmup"],
                "repeats": shape["repeats"], "mrgfast_backend": backend, "threads": torch.get_num_threads(),
                "step": "embeds = embedding(ids) (frozen); sequence with the prompts at rows OFFSET..OFFSET+L-1; "
                        "sequence.backward(g) into P, gamma, beta, w",
                "headline": "least favourable case: seq_* fused_out (in-place) vs eager, op_* fused vs eager; "
                            "fused_cat_* = fused op + torch.cat"}, results)


if __name__ == "__main__":
    main()
