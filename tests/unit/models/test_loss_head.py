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
@pytest.mark.parametrize("chunk", [7, 64, 4096])  # not dividing the vocabulary, several chunks, all at once
@pytest.mark.parametrize("shape", [(3, 41, 24, 301), (1, 24, 384, 700)])  # many tokens; few tokens, a wide model
def test_loss_and_gradients_equal_the_plain_head(dtype, tol, chunk, shape):
    torch.manual_seed(0)
    b, n, h, v = shape
    hidden = torch.randn(b, n, h).to(dtype).requires_grad_()
    weight = (0.3 * (24 / h) ** 0.5 * torch.randn(v, h)).to(dtype).requires_grad_()  # (logits of one spread)
    bias = torch.randn(v).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, n))
    labels[0, :10] = -100  # a masked prompt
    labels[-1, n - 3 :] = -100
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


def kept_between_forward_and_backward(loss_fn, *inputs):
    """Bytes of the tensors the autograd graph of `loss_fn(*inputs)` saves for its backward, beyond the inputs'
    own storage (the hidden states and the weight are held anyway)."""
    own = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(*inputs)
    return sum(kept.values()), loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_between_forward_and_backward_the_head_keeps_per_token_values_not_a_weight_gradient(dtype):
    """Few tokens, a wide model and a large vocabulary (a 70B-class model at one row, scaled down): what the
    fused head holds from its forward to its backward is a few numbers per token, not a V x H weight gradient
    (it used to keep an fp32 one made in the forward: 10 bytes per weight in all, 1.6x the plain head's
    peak there). The backward still gives the plain head's gradients."""
    torch.manual_seed(0)
    tokens, width, vocab = 16, 256, 4096
    hidden = torch.randn(1, tokens, width).to(dtype).requires_grad_()
    weight = (0.05 * torch.randn(vocab, width)).to(dtype).requires_grad_()
    bias = torch.randn(vocab).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    kept, loss = kept_between_forward_and_backward(
        lambda *t: causal_lm_loss(*t, chunk=1000), hidden, weight, labels, bias
    )
    assert kept <= tokens * 16 + 64  # the shifted labels (int64), the log-sum-exps (fp32), the count
    plain_kept, plain = kept_between_forward_and_backward(plain_loss, hidden, weight, labels, bias)
    assert plain_kept >= (tokens - 1) * vocab * 4  # (the measure sees what the plain head keeps: its fp32 logits)
    loss.backward()
    fused_grads = [t.grad.clone() for t in (hidden, weight, bias)]
    hidden.grad = weight.grad = bias.grad = None
    plain.backward()
    tol = 1e-6 if dtype == torch.float32 else 3e-3
    for fused, want in zip(fused_grads, (hidden.grad, weight.grad, bias.grad), strict=True):
        assert fused.dtype == dtype
        torch.testing.assert_close(fused.float(), want.float(), rtol=tol, atol=tol)


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
