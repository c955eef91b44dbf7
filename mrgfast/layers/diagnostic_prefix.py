"""DiagnosticPrefix (RAD3D-Prefix): volume embedding + diagnostic logits + learnable constants -> LLM prefix tokens."""

from typing import Optional

import torch
from torch import Tensor, nn


class MapperBlock(nn.Module):
    """One pre-norm transformer block of the ClipCap mapper (attention, then a ReLU MLP of width 2x)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]; every token attends to every other (no mask: the prefix is not causal)."""
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DiagnosticPrefix(nn.Module):
    """Maps [volume embedding ⊕ multi-label logits] and learnable constants to `n_prefix` LLM-space tokens.

    The ClipCap transformer mapper as RAD3D-Prefix uses it: the concatenated vector is projected to
    `n_inputs` mapper tokens, `n_prefix` learnable constant tokens are appended, `mapper_layers` transformer
    blocks mix them, and the outputs at the constants' positions, projected to `llm_dim`, are the prefix.
    The logits come from the caller or from `classifier` (frozen and detached unless `train_classifier`).
    """

    def __init__(self, embed_dim: int, n_labels: int, llm_dim: int, n_prefix: int = 10, mapper_layers: int = 8,
                 mapper_dim: Optional[int] = None, n_heads: int = 8, n_inputs: Optional[int] = None,
                 dropout: float = 0.0, classifier: Optional[nn.Module] = None, train_classifier: bool = False):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("n_labels", n_labels), ("llm_dim", llm_dim),
                            ("n_prefix", n_prefix), ("mapper_layers", mapper_layers), ("n_heads", n_heads)):
            if value <= 0:
                raise ValueError(f"DiagnosticPrefix: {name} must be positive, got {value}")
        mapper_dim = mapper_dim or llm_dim
        if mapper_dim % n_heads:
            raise ValueError(f"DiagnosticPrefix: mapper_dim={mapper_dim} must be divisible by n_heads={n_heads}")
        self.embed_dim, self.n_labels, self.llm_dim = embed_dim, n_labels, llm_dim
        self.n_prefix = n_prefix
        self.n_inputs = n_inputs or n_prefix
        self.mapper_dim = mapper_dim
        self.input_proj = nn.Linear(embed_dim + n_labels, self.n_inputs * mapper_dim)
        # ClipCap initialises its learnable prefix constants from a standard normal.
        self.constants = nn.Parameter(torch.randn(n_prefix, mapper_dim))
        self.blocks = nn.ModuleList(MapperBlock(mapper_dim, n_heads, dropout=dropout) for _ in range(mapper_layers))
        self.output_proj = nn.Identity() if mapper_dim == llm_dim else nn.Linear(mapper_dim, llm_dim)
        self.classifier = classifier
        self.train_classifier = train_classifier
        if classifier is not None and not train_classifier:
            classifier.requires_grad_(False)

    def diagnostic_logits(self, embedding: Tensor, logits: Optional[Tensor],
                          classifier_input: Optional[Tensor]) -> Tensor:
        """The [B, n_labels] logits: given, or from the classifier; detached unless the classifier trains."""
        if logits is None:
            if self.classifier is None:
                raise ValueError("DiagnosticPrefix: pass `logits` [B, n_labels] or build it with a `classifier`")
            source = embedding if classifier_input is None else classifier_input
            if self.train_classifier:
                logits = self.classifier(source)
            else:
                # A frozen classifier stays in eval mode (dropout/batch-norm statistics fixed) and builds no graph.
                was_training = self.classifier.training
                self.classifier.eval()
                with torch.no_grad():
                    logits = self.classifier(source)
                self.classifier.train(was_training)
        elif not self.train_classifier:
            logits = logits.detach()
        if logits.dim() != 2 or logits.shape != (embedding.shape[0], self.n_labels):
            raise ValueError(f"DiagnosticPrefix: logits must be [B, n_labels] = [{embedding.shape[0]}, {self.n_labels}],"
                             f" got {tuple(logits.shape)}")
        return logits

    def forward(self, embedding: Tensor, logits: Optional[Tensor] = None, classifier_input: Optional[Tensor] = None,
                return_logits: bool = False):
        """embedding [B, embed_dim] (+ logits [B, n_labels]) -> prefix [B, n_prefix, llm_dim] (and the logits)."""
        if embedding.dim() != 2 or embedding.shape[1] != self.embed_dim:
            raise ValueError(f"DiagnosticPrefix: embedding must be [B, embed_dim={self.embed_dim}], "
                             f"got {tuple(embedding.shape)}")
        logits = self.diagnostic_logits(embedding, logits, classifier_input)
        batch = embedding.shape[0]
        features = torch.cat([embedding, logits.to(embedding.dtype)], dim=-1)
        inputs = self.input_proj(features).view(batch, self.n_inputs, self.mapper_dim)
        tokens = torch.cat([inputs, self.constants.to(inputs.dtype).expand(batch, -1, -1)], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        prefix = self.output_proj(tokens[:, self.n_inputs:])
        return (prefix, logits) if return_logits else prefix
