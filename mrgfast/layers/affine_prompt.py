"""AffinePromptGenerator: MRG-LLM's instance-specific prompts, learnable prompts modulated by the image (FiLM)."""

from typing import Optional

import torch
from torch import Tensor, nn

from mrgfast.ops.affine_prompt import OffsetsLike, affine_prompt

POOLS = ("mean", "max", "first")
PROMPT_INIT_STD = 0.02  # small normal, as learnable prompt tokens are usually initialised


def check_generator_args(visual_dim, llm_dim, n_prompts, book_size, hidden_dim, pool) -> None:
    """Raise ValueError naming the constructor argument that is out of range."""
    for name, value in (("visual_dim", visual_dim), ("llm_dim", llm_dim), ("n_prompts", n_prompts),
                        ("book_size", book_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0):
        raise ValueError(f"hidden_dim must be a positive int or None (= visual_dim), got {hidden_dim!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


class AffinePromptGenerator(nn.Module):
    """Prompt embeddings [B, L, llm_dim] from visual features: (sum_k w_k P_k) * (1 + gamma(v)) + beta(v).

    book_size == 1 is MRG-LLM's prompt-wise variant (one prompt set P [L, D]); book_size > 1 the
    promptbook-wise one (a bank P [K, L, D] mixed by w = softmax(mixer(v)) [B, K]). gamma and beta are
    [B, D] (one modulation per image) or, with per_token, [B, L, D]. The heads that produce gamma, beta
    and the mixing logits start at zero, so the initial output is P (for a book: the bank's uniform mix).
    """

    def __init__(self, visual_dim: int, llm_dim: int, n_prompts: int, book_size: int = 1,
                 hidden_dim: Optional[int] = None, per_token: bool = False, pool: str = "mean"):
        super().__init__()
        check_generator_args(visual_dim, llm_dim, n_prompts, book_size, hidden_dim, pool)
        self.visual_dim, self.llm_dim, self.n_prompts, self.book_size = visual_dim, llm_dim, n_prompts, book_size
        self.per_token, self.pool = bool(per_token), pool
        hidden = hidden_dim or visual_dim
        bank = (n_prompts, llm_dim) if book_size == 1 else (book_size, n_prompts, llm_dim)
        self.prompts = nn.Parameter(torch.randn(bank) * PROMPT_INIT_STD)
        self.trunk = nn.Sequential(nn.Linear(visual_dim, hidden), nn.GELU())
        # gamma and beta from one head: [gamma | beta], each D (or L * D per token) wide.
        self.film = nn.Linear(hidden, 2 * llm_dim * (n_prompts if per_token else 1))
        self.mixer = nn.Linear(hidden, book_size) if book_size > 1 else None
        for head in (self.film, self.mixer):
            if head is not None:  # zero heads: gamma = beta = 0 and equal mixing logits at the start
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def pooled(self, visual_features: Tensor) -> Tensor:
        """[B, visual_dim] from [B, N, visual_dim] tokens (pooled as configured) or already pooled features."""
        if visual_features.dim() not in (2, 3) or visual_features.shape[-1] != self.visual_dim:
            raise ValueError(f"visual_features must be [B, N, {self.visual_dim}] or [B, {self.visual_dim}], "
                             f"got shape {tuple(visual_features.shape)}")
        if visual_features.dim() == 2:
            return visual_features
        if visual_features.shape[1] == 0:
            raise ValueError("visual_features has no tokens to pool (N = 0)")
        if self.pool == "mean":
            return visual_features.mean(1)
        if self.pool == "max":
            return visual_features.amax(1)
        return visual_features[:, 0]

    def modulation(self, visual_features: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(gamma, beta, mixing weights or None) for a batch of visual features."""
        hidden = self.trunk(self.pooled(visual_features))
        batch = hidden.shape[0]
        gamma, beta = self.film(hidden).chunk(2, dim=-1)
        if self.per_token:
            gamma = gamma.reshape(batch, self.n_prompts, self.llm_dim)
            beta = beta.reshape(batch, self.n_prompts, self.llm_dim)
        weights = self.mixer(hidden).softmax(-1) if self.mixer is not None else None
        return gamma, beta, weights

    def forward(self, visual_features: Tensor, out: Optional[Tensor] = None, offsets: OffsetsLike = None) -> Tensor:
        """[B, L, llm_dim] prompt embeddings, or `out` [B, T, llm_dim] with them written at rows offsets[b] + l."""
        gamma, beta, weights = self.modulation(visual_features)
        # One dtype for the fused op: the embedding buffer's when writing into it, else the heads' output
        # dtype (which follows autocast); the prompts are cast to it (their fp32 master copy stays as is).
        dtype = out.dtype if out is not None else gamma.dtype
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return affine_prompt(cast(self.prompts), cast(gamma), cast(beta), cast(weights), out=out, offsets=offsets)

    def extra_repr(self) -> str:
        """The sizes, as printed inside the module tree."""
        return (f"visual_dim={self.visual_dim}, llm_dim={self.llm_dim}, n_prompts={self.n_prompts}, "
                f"book_size={self.book_size}, per_token={self.per_token}, pool={self.pool!r}")
