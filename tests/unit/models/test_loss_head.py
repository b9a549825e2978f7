"""The fused, chunked loss head: the same loss and gradients as the plain head (logits, then cross-entropy),
without the full logits."""

import pytest
import torch

from dist_clm.models import loss_head
from dist_clm.models.loss_head import causal_lm_loss


def plain_loss(hidden, weight, labels, bias=None):
    logits = (hidden @ weight.T + (0 if bias is None else bias)).float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 3e-3)])
@pytest.mark.parametrize("chunk", [7, 64, 4096])  # not dividing the rows, one chunk per row block, all at once
def test_loss_and_gradients_equal_the_plain_head(dtype, tol, chunk):
    torch.manual_seed(0)
    b, n, h, v = 3, 41, 24, 301
    hidden = torch.randn(b, n, h).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h)).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, n))
    labels[0, :10] = -100  # a masked prompt
    labels[2, 30:] = -100
    grads = []
    for fn in (
        lambda: causal_lm_loss(hidden, weight, labels, bias, chunk),
        lambda: plain_loss(hidden, weight, labels, bias),
    ):
        loss = fn()
        loss.backward()
        grads.append([loss.detach().float(), *(t.grad.float().clone() for t in (hidden, weight, bias))])
        hidden.grad = weight.grad = bias.grad = None
    for fused, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)
    assert grads[0][1][0, :9].abs().max() == 0  # a masked token's prediction contributes nothing


def test_a_fully_masked_batch_has_loss_zero_and_no_gradient():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = causal_lm_loss(hidden, weight, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_an_installed_model_trains_on_the_same_loss_and_gradients(preset, tokenizer_dir):
    """GPT-2 (tied embeddings) and Llama (untied), with restarting positions as document masking makes them."""
    from dist_clm.data.tokenizer import load_tokenizer
    from dist_clm.models.build import build_model

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    plain = build_model(preset, "", {}, tok)
    fused = build_model(preset, "", {}, tok)
    fused.load_state_dict(plain.state_dict())
    assert loss_head.install(fused, chunk=50)
    ids = torch.randint(0, len(tok), (2, 64))
    positions = torch.cat([torch.arange(20), torch.arange(44)]).expand(2, 64)
    labels = ids.clone()
    labels[:, 20] = -100
    out = []
    for model in (plain, fused):
        loss = model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    logits = fused(input_ids=ids).logits  # without labels: the plain forward, logits and all
    torch.testing.assert_close(logits, plain(input_ids=ids).logits)
