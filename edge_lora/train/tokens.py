"""New tokens: grow the vocabulary and train only the new embedding (and output) rows.

The base rows stay frozen and untouched; the new rows live in their own parameters and are saved
in the adapter file (``Adapter.embed_rows`` / ``head_rows``). On a tied-embedding base the output
layer reuses the new embedding rows, so only ``embed_rows`` is saved.
New rows start at the mean of the existing rows (a common, stable initialisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from edge_lora.adapter import Adapter


class ExtendedEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, n_new: int):
        super().__init__()
        self.base = base
        self.base_vocab = base.weight.shape[0]
        self.new_rows = nn.Parameter(
            base.weight.detach().float().mean(0, keepdim=True).repeat(n_new, 1).to(base.weight.dtype)
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.base_vocab
        x = self.base(ids.clamp(max=v - 1))
        is_new = ids >= v
        if not bool(is_new.any()):
            return x + 0.0 * self.new_rows.sum()  # keep the new rows in the graph (DDP expects a gradient)
        extra = F.embedding((ids - v).clamp(min=0), self.new_rows)
        return torch.where(is_new[..., None], extra, x)


def add_new_tokens(model: nn.Module, n_new: int) -> None:
    """Give ``model`` ``n_new`` trainable embedding rows (and output rows when the head is untied)."""
    if n_new <= 0:
        return
    base_embed = model.model.embed_tokens
    model.model.embed_tokens = ExtendedEmbedding(base_embed, n_new)
    if model.config.tie_word_embeddings:
        model.head_new_rows = None
    else:
        w = model.lm_head.weight.detach().float()
        model.head_new_rows = nn.Parameter(
            w.mean(0, keepdim=True).repeat(n_new, 1).to(model.lm_head.weight.dtype)
        )


def head_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(frozen base rows, trainable new rows or None)`` of the output layer."""
    embed = model.model.embed_tokens
    if not isinstance(embed, ExtendedEmbedding):
        return model.lm_head.weight, None
    if model.config.tie_word_embeddings:
        return model.lm_head.weight, embed.new_rows
    return model.lm_head.weight, model.head_new_rows


def new_rows(model: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(embed_rows, head_rows)`` to save in the adapter (head rows only on an untied base)."""
    embed = model.model.embed_tokens
    if not isinstance(embed, ExtendedEmbedding):
        return None, None
    head = None if model.config.tie_word_embeddings else model.head_new_rows
    return embed.new_rows, head


def attach_new_tokens(adapter: Adapter, model: nn.Module, tokens: list[str]) -> None:
    """Put the model's new-token rows (if any) and their strings into ``adapter`` before it is saved."""
    embed, head = new_rows(model)
    if embed is None:
        return
    adapter.added_tokens = list(tokens)
    adapter.embed_rows = embed.detach().float().cpu().numpy()
    adapter.head_rows = None if head is None else head.detach().float().cpu().numpy()


def load_new_tokens(model: nn.Module, adapter: Adapter) -> None:
    """Give ``model`` the adapter's new-token rows (for evaluation), frozen like the rest."""
    if adapter.embed_rows is None:
        return
    add_new_tokens(model, len(adapter.embed_rows))
    with torch.no_grad():
        model.model.embed_tokens.new_rows.copy_(torch.from_numpy(adapter.embed_rows))
        if adapter.head_rows is not None:
            model.head_new_rows.copy_(torch.from_numpy(adapter.head_rows))
    for p in (model.model.embed_tokens.new_rows, getattr(model, "head_new_rows", None)):
        if p is not None:
            p.requires_grad_(False)
