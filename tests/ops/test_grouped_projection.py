"""grouped_projection on every backend against Linear(group_tokens(LayerNorm(x))): output and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from mrgfast.ops.group_tokens import group_layout
from mrgfast.ops.grouped_projection import grouped_projection, reference_grouped_projection
from tests.ops.op_cases import BACKENDS, GPU_BACKENDS, assert_close, use_backend
from tests.ops.test_group_tokens import GPU_SHAPES

# (batch, tokens, dim, out, group, mode, grid, pad, normalize, bias): odd dims (40, 72), odd outs, padding.
CASES = [
    (2, 10, 40, 33, 4, "1d", None, True, True, True),
    (1, 12, 72, 17, 3, "1d", None, False, True, False),
    (2, 15, 40, 33, 4, "2d", (3, 5), True, True, True),
    (2, 36, 24, 19, 9, "2d", (6, 6), False, False, True),
    (1, 16, 72, 21, 4, "2d", (4, 4), False, True, True),
    (3, 9, 5, 7, 4, "2d", (3, 3), True, False, False),
    (1, 1, 7, 3, 4, "1d", None, True, True, True),  # a single token: one grouped row, three padding slots
    (0, 8, 6, 5, 4, "2d", (2, 4), False, True, True),  # empty batch
]
# Which inputs train: PeFoMed's (projector only; frozen ViT and ln_vision), everything, or x with a frozen norm.
TRAINING = {"projector": (False, True, False), "all": (True, True, True), "x_frozen_norm": (True, True, False)}
def make_inputs(batch, tokens, dim, out, group, dtype, bias, training, seed=0):
    """x, W, b, gamma, beta (gamma/beta away from 1/0 so their handling shows) with the asked requires_grad."""
    x_grad, proj_grad, norm_grad = TRAINING[training]
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x = (rand(batch, tokens, dim) * 2 + 0.5).to(dtype).requires_grad_(x_grad)
    weight = (rand(out, group * dim) / (group * dim) ** 0.5).to(dtype).requires_grad_(proj_grad)
    b = rand(out).to(dtype).requires_grad_(proj_grad) if bias else None
    gamma = (1 + 0.3 * rand(dim)).to(dtype).requires_grad_(norm_grad)
    beta = (0.3 * rand(dim)).to(dtype).requires_grad_(norm_grad)
    return x, weight, b, gamma, beta


def grads_of(y, tensors, grad_y):
    """Gradients of the tensors in `tensors` that require one (None for the others)."""
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, grad_y.to(y.dtype), allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in tensors]




def matrix():
    """Every (backend, dtype, training, case); the interpreted Triton kernels (~2 s a test) get every case with
    everything trained (all five kernels run) in fp32, and a subset in bf16 and with the projector alone."""
    for backend in BACKENDS:
        name = getattr(backend, "values", (backend,))[0]
        for dtype in (torch.float32, torch.bfloat16):
            for training in TRAINING:
                for i, case in enumerate(CASES):
                    if name == "triton" and not (training == "all" and (dtype == torch.float32 or i < 3)
                                                 or training == "projector" and i == 2):
                        continue
                    marks = getattr(backend, "marks", ())
                    ids = f"{name}-{str(dtype).split('.')[-1]}-{training}-case{i}"
                    yield pytest.param(name, dtype, training, *case, marks=marks, id=ids)


@pytest.mark.parametrize("backend,dtype,training,batch,tokens,dim,out,group,mode,grid,pad,normalize,bias",
                         list(matrix()))
def test_matches_eager_composition(monkeypatch, backend, dtype, training, batch, tokens, dim, out, group, mode, grid,
                                   pad, normalize, bias):
    use_backend(monkeypatch, backend)
    tensors = make_inputs(batch, tokens, dim, out, group, dtype, bias, training)
    x, weight, b, gamma, beta = tensors
    y = grouped_projection(x, weight, b, group, mode, grid, pad, normalize=normalize, norm_weight=gamma,
                           norm_bias=beta)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = grads_of(y, tensors, grad_y)
    # The oracle: eager LayerNorm -> reference grouping -> Linear in fp32 on the same (rounded) inputs.
    as32 = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    layout = group_layout(x.shape, group, mode, grid, pad)
    y_ref = reference_grouped_projection(as32[0], as32[1], as32[2], layout, normalize, as32[3], as32[4])
    grads_ref = grads_of(y_ref, as32, grad_y)
    assert y.dtype == dtype and y.shape == (batch, layout.groups, out)
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dW", "db", "dgamma", "dbeta"), grads, grads_ref):
        if want is None:  # not requiring grad, or the norm is off: no gradient may appear
            assert got is None, f"{name}: unexpected gradient"
            continue
        assert got is not None and got.dtype == dtype, f"{name}: missing or wrong dtype"
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_slots_are_zero_after_the_norm(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    # One 3-token image, group 2, pad: slot 4 is padding; with W picking that slot's features, y is bias only.
    x = torch.randn(1, 3, 8)
    weight = torch.zeros(5, 16)
    weight[:, 8:] = 1.0
    bias = torch.arange(5.0)
    y = grouped_projection(x, weight, bias, 2, pad=True, norm_weight=torch.ones(8), norm_bias=torch.full((8,), 3.0))
    assert torch.allclose(y[0, 1], bias)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_backward_keeps_no_grouped_copy(monkeypatch, backend):
    """The eager path saves LayerNorm's output and the grouped matrix; mrgfast saves only x-sized tensors."""
    use_backend(monkeypatch, backend)
    x, weight, b, gamma, beta = make_inputs(2, 15, 40, 33, 4, torch.float32, True, "all")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grouped_projection(x, weight, b, 4, "2d", (3, 5), pad=True, norm_weight=gamma, norm_bias=beta)
    big = [tuple(t.shape) for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()
           and t.data_ptr() != weight.data_ptr()]
    assert big == [], f"saved activations besides x and W: {big}"


def test_bad_weights_raise_value_errors():
    x = torch.randn(1, 8, 6)
    with pytest.raises(ValueError, match=r"weight must be \[out, group \* D\] = \[out, 4 \* 6\]"):
        grouped_projection(x, torch.randn(5, 23), None, 4)
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        grouped_projection(x, torch.randn(5, 24), torch.randn(4), 4)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[6\]"):
        grouped_projection(x, torch.randn(5, 24), None, 4, norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match="must share a dtype"):
        grouped_projection(x, torch.randn(5, 24, dtype=torch.float64), None, 4)
    with pytest.raises(ValueError, match="N=8 tokens is not divisible by group=3"):
        grouped_projection(x, torch.randn(5, 18), None, 3)


def test_reference_is_pefomeds_code():
    """The oracle itself: PeFoMed's ln_vision -> view(B, N // 4, 4 D) -> llama_proj, written out."""
    x, weight, b, gamma, beta = (t.detach() for t in make_inputs(2, 16, 6, 5, 4, torch.float32, True, "all"))
    want = F.linear(F.layer_norm(x, (6,), gamma, beta, 1e-5).view(2, 4, 24), weight, b)
    got = reference_grouped_projection(x, weight, b, group_layout(x.shape, 4), True, gamma, beta)
    assert torch.equal(got, want)


# GPU: every GPU backend on a real GPU against the fp32 reference, on the GPU shapes of the grouping tests.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,tokens,dim,out,group,mode,grid,pad", GPU_SHAPES)
@pytest.mark.parametrize("train_x", [False, True], ids=["frozen_x", "train_x"])
def test_grouped_projection_on_gpu(monkeypatch, backend, dtype, batch, tokens, dim, out, group, mode, grid, pad,
                                   train_x):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    x = (rand(batch, tokens, dim) * 2 + 0.5).to(dtype).requires_grad_(train_x)
    weight = (rand(out, group * dim) / (group * dim) ** 0.5).to(dtype).requires_grad_()
    bias = rand(out).to(dtype).requires_grad_()
    gamma = (1 + 0.3 * rand(dim)).to(dtype).requires_grad_(train_x)
    beta = (0.3 * rand(dim)).to(dtype).requires_grad_(train_x)
    tensors = [t for t in (x, weight, bias, gamma, beta) if t.requires_grad]
    y = grouped_projection(x, weight, bias, group, mode, grid, pad, norm_weight=gamma, norm_bias=beta)
    grad_y = rand(*y.shape).to(dtype)
    grads = torch.autograd.grad(y, tensors, grad_y)
    as32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, weight, bias, gamma, beta)]
    layout = group_layout(x.shape, group, mode, grid, pad)
    y_ref = reference_grouped_projection(as32[0], as32[1], as32[2], layout, True, as32[3], as32[4])
    grads_ref = torch.autograd.grad(y_ref, [t for t in as32 if t.requires_grad], grad_y.float())
    assert_close(y, y_ref, dtype, "y")
    names = [n for n, t in zip(("dx", "dW", "db", "dgamma", "dbeta"), (x, weight, bias, gamma, beta))
             if t.requires_grad]
    for name, got, want in zip(names, grads, grads_ref):
        assert_close(got, want, dtype, name)


@pytest.mark.gpu
def test_triton_projection_is_deterministic():
    x = torch.randn(2, 1024, 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, 4 * 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gamma = torch.ones(1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs = [torch.autograd.grad(grouped_projection(x, w, None, 4, norm_weight=gamma).float().square().sum(),
                                (x, w, gamma)) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(*runs))
