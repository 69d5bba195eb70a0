"""Cross-entropy through the output layer without materializing the logits of the whole batch.

The batch's target positions are processed in chunks; each chunk's logits are computed, turned
into the loss *and* into the gradient of the hidden states right away, then dropped. Autograd
keeps only ``grad_hidden`` (``[N, hidden]``) instead of ``[N, vocab]`` logits, softmax and their
gradients (a 49k vocabulary makes those the largest tensors of a step). The FLOPs are those of
an ordinary frozen ``lm_head``: one matmul forward, one for the input gradient.

``extra`` holds trainable rows appended to the vocabulary (new tokens); their gradient is
accumulated in the same pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.autograd.function import FunctionCtx

if TYPE_CHECKING:
    from edge_lora.train.quant import QuantEmbedding

CHUNK_BYTES = 64 * 1024 * 1024


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        extra: torch.Tensor | None,
        chunk: int,
    ) -> torch.Tensor:
        need_h, need_e = ctx.needs_input_grad[0], extra is not None and ctx.needs_input_grad[3]
        vocab = weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_e = torch.zeros_like(extra, dtype=torch.float32) if need_e else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            if extra is not None:
                logits = torch.cat((logits, (h @ extra.t()).float()), dim=1)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_e:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                probs = probs.to(hidden.dtype)
                if need_h:
                    g = probs[:, :vocab] @ weight
                    if extra is not None:
                        g += probs[:, vocab:] @ extra
                    grad_h[start : start + chunk] = g
                if need_e:
                    grad_e += (probs[:, vocab:].t() @ h).float()
        ctx.save_for_backward(grad_h, grad_e)
        ctx.extra_dtype = None if extra is None else extra.dtype
        return total

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        grad_h, grad_e = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        ge = None if grad_e is None else (grad_e * grad_out).to(ctx.extra_dtype)
        return gh, None, None, ge, None


class _TableLinearCE(torch.autograd.Function):
    """The same loss over a quantized table (``rows(start, end)`` dequantizes a slice), in vocabulary
    chunks: pass one finds each position's log-sum-exp online, pass two turns each chunk's softmax
    into the gradient. Each slice is dequantized twice per step and dropped; logits live one chunk
    at a time, ``[N, rows]``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        table: QuantEmbedding,
        extra: torch.Tensor | None,
        rows: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        vocab = table.shape[0]
        chunks = [(s, min(s + rows, vocab)) for s in range(0, vocab, rows)]

        def logits_of(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            w = table.rows(start, end, hidden.dtype) if end <= vocab else extra
            return (hidden @ w.t()).float(), w

        spans = chunks + ([(vocab, vocab + extra.shape[0])] if extra is not None else [])
        top = torch.full((n,), float("-inf"), device=hidden.device)
        total_exp = torch.zeros(n, device=hidden.device)
        picked = torch.zeros(n, device=hidden.device)
        for start, end in spans:
            logits, _ = logits_of(start, end)
            new_top = torch.maximum(top, logits.max(1).values)
            total_exp = total_exp * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(1)
            top = new_top
            inside = (targets >= start) & (targets < end)
            picked[inside] = logits[inside, targets[inside] - start]
        lse = top + torch.log(total_exp)
        need_h, need_e = ctx.needs_input_grad[0], extra is not None and ctx.needs_input_grad[3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_e = torch.zeros_like(extra, dtype=torch.float32) if need_e else None
        if need_h or need_e:
            for start, end in spans:
                logits, w = logits_of(start, end)
                probs = logits.sub_(lse[:, None]).exp_()
                inside = (targets >= start) & (targets < end)
                probs[inside, targets[inside] - start] -= 1.0
                probs = probs.to(hidden.dtype)
                if need_h:
                    grad_h += probs @ w
                if need_e and start >= vocab:
                    grad_e += (probs.t() @ hidden).float()
        ctx.save_for_backward(grad_h, grad_e)
        ctx.extra_dtype = None if extra is None else extra.dtype
        return (lse - picked).sum()

    backward = staticmethod(_FusedLinearCE.backward)


def linear_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | QuantEmbedding,
    extra: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ [weight; extra]^T`` against ``targets`` (``hidden`` is
    ``[N, h]``). ``weight`` is a tensor, or a quantized table with ``rows(start, end, dtype)`` (a tied
    base under --base-quant)."""
    vocab = weight.shape[0] + (0 if extra is None else extra.shape[0])
    if hasattr(weight, "rows"):
        rows = chunk or max(1, CHUNK_BYTES // (4 * max(1, hidden.shape[0])))
        return _TableLinearCE.apply(hidden, targets, weight, extra, rows)
    chunk = chunk or max(1, CHUNK_BYTES // (4 * vocab))
    return _FusedLinearCE.apply(hidden, targets, weight, extra, chunk)
