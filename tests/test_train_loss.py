"""The trainer's memory-saving pieces compute exactly what the plain formulas do."""

import torch
import torch.nn.functional as F
from tiny_models import load_hf

from edge_lora.train.loss import linear_cross_entropy
from edge_lora.train.model import CausalLM, _RMSNormFn, _SwiGLU


def test_fused_linear_cross_entropy_matches_plain():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16)
    extra = torch.randn(3, 16, requires_grad=True)
    t = torch.randint(0, 53, (37,))
    loss = linear_cross_entropy(h, t, w, extra, chunk=8)
    loss.backward()
    h2, e2 = h.detach().clone().requires_grad_(), extra.detach().clone().requires_grad_()
    ref = F.cross_entropy(torch.cat([h2 @ w.t(), h2 @ e2.t()], 1), t, reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-4)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5) and torch.allclose(extra.grad, e2.grad, atol=1e-5)


def test_custom_autograd_functions_gradcheck():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), (x, w))
    g = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (g, u))


def test_input_gradients_match_transformers(model_dirs):
    """Backward through our model (custom norm, SwiGLU, GQA attention) equals transformers'."""
    ours = CausalLM.from_model_dir(model_dirs["mistral"])
    ref = load_hf(model_dirs["mistral"])
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    e1 = ours.model.embed_tokens(ids).detach().requires_grad_()
    e2 = e1.detach().clone().requires_grad_()
    ours.model.embed_tokens.forward = lambda _ids: e1
    out1 = ours(ids)
    out2 = ref(inputs_embeds=e2).logits
    (out1 * torch.linspace(-1, 1, out1.shape[-1])).sum().backward()
    (out2 * torch.linspace(-1, 1, out2.shape[-1])).sum().backward()
    assert (e1.grad - e2.grad).abs().max() < 1e-4
