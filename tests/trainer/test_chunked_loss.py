"""Chunked head + cross-entropy (trainer.loss.linear_cross_entropy) against the full computation:
compute_loss on the whole [tokens, vocab] logits. Loss and every gradient must agree (softcap, masks,
tied head, chunk sizes that do not divide the token count), and no [tokens, vocab] tensor may appear."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.loss import compute_loss, linear_cross_entropy
from trainer.models import build_model

torch.set_num_threads(1)
N, D, V = 61, 8, 50  # 61 is prime: no chunk size below divides it


def full_loss(h, w, y, mask, softcap):
    """Today's path: the model's fp32 logits, softcapped, then compute_loss."""
    logits = F.linear(h, w).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return compute_loss(logits, y, mask)


def leaves(seed=0):
    """hidden and head weight at a scale where logits reach several units, so a softcap bends them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = torch.randn(V, D, generator=g).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def sparse_mask(chunk, seed=0):
    """SFT-like: about half the tokens count, and the whole first chunk counts for nothing."""
    m = (torch.rand(N, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    m[:chunk] = 0
    return m


def grads(loss, *params):
    """Gradients of 3 x loss: a non-unit incoming gradient, as gradient accumulation gives."""
    return torch.autograd.grad(3.0 * loss, params)


@pytest.mark.parametrize("chunk", [1, 7, N, 4 * N])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_full_fp32(chunk, softcap, masked):
    h, w, y = leaves()
    mask = sparse_mask(min(chunk, N // 2)) if masked else None
    ref = full_loss(h, w, y, mask, softcap)
    out = linear_cross_entropy(h, w, y, mask, softcap, chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out, h, w), grads(ref, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_masked_chunk_gets_zero_gradient_and_all_masked_is_zero():
    h, w, y = leaves(1)
    mask = sparse_mask(16)
    gh, _ = grads(linear_cross_entropy(h, w, y, mask, 4.0, 16), h, w)
    assert gh[:16].abs().max() == 0 and gh[16:].abs().max() > 0
    none = torch.zeros(N)  # compute_loss divides by max(mask sum, 1): loss 0, gradients 0
    out = linear_cross_entropy(h, w, y, none, 4.0, 16)
    assert out.item() == 0.0 == full_loss(h, w, y, none, 4.0).item()
    assert all(g.abs().max() == 0 for g in grads(out, h, w))


def test_ignored_targets_as_in_cross_entropy():
    h, w, y = leaves(2)
    y[::5] = -100
    for mask in (None, sparse_mask(7)):
        ref, out = full_loss(h, w, y, mask, None), linear_cross_entropy(h, w, y, mask, None, 7)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads(out, h, w), grads(ref, h, w)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tied_head_gradient_reaches_the_embedding_through_both_uses():
    torch.manual_seed(3)
    emb = nn.Embedding(V, D)
    ids, y = torch.randint(0, V, (2, 31)), torch.randint(0, V, (2, 31))

    def loss_with(fn):
        h = F.rms_norm(emb(ids), (D,)) * 2.0
        return fn(h, emb.weight, y, None, 4.0)

    (want,) = grads(loss_with(full_loss), emb.weight)
    (got,) = grads(loss_with(lambda *a: linear_cross_entropy(*a, chunk=9)), emb.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_grad_gives_the_loss_only():
    h, w, y = leaves(4)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, y, sparse_mask(7), 4.0, 7)
        torch.testing.assert_close(out, full_loss(h, w, y, sparse_mask(7), 4.0), rtol=1e-5, atol=1e-5)
    assert not out.requires_grad


def test_bf16_autocast_within_bf16_tolerance():
    """Matmuls in bf16 as under the trainer's autocast, the rest in fp32: both paths round alike."""
    h, w, y = leaves(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = full_loss(h, w, y, None, 4.0)
        out = linear_cross_entropy(h, w, y, None, 4.0, 7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads(out, h, w), grads(ref, h, w)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_backward_twice_fails_loudly():
    """Backward scales the stored gradients in place; a second pass must not reuse them silently."""
    h, w, y = leaves(6)
    out = linear_cross_entropy(h, w, y, None, None, 7)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()


class MaxNumel(TorchDispatchMode):
    """The largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.max = max([self.max] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


@pytest.mark.parametrize("chunked", [True, False])
def test_no_tokens_by_vocab_tensor_exists(chunked):
    """Forward and backward: nothing bigger than a chunk of logits or the weight/hidden gradients."""
    h, w, y = leaves(7)
    bound = max(7 * V, V * D, N * D)
    assert bound < N * V
    with MaxNumel() as seen:
        out = linear_cross_entropy(h, w, y, sparse_mask(7), 4.0, 7) if chunked \
            else full_loss(h, w, y, sparse_mask(7), 4.0)
        grads(out, h, w)
    assert (seen.max <= bound) == chunked, seen.max


# ------------------------------------------------------------------------------ model level

def tiny_dense(**kw):
    """Argonne's structure (sandwich norms, QK/V-norm, tied head, softcap) at toy size; a low softcap
    so it bends the logits of a freshly initialised model."""
    torch.manual_seed(0)
    cfg = {"arch": "dense", "preset": "argonne-3.0", "vocab_size": 97, "d_model": 32, "n_layers": 2,
           "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 48, "logit_softcap": 1.5}
    return build_model({**cfg, **kw})


def tiny_hybrid():
    torch.manual_seed(0)
    return build_model({"arch": "hybrid", "preset": "hybrid-tiny", "vocab_size": 97, "use_fla": False})


@pytest.mark.parametrize("make", [tiny_dense, lambda: tiny_dense(tie_embeddings=False), tiny_hybrid],
                         ids=["dense-tied", "dense-untied", "hybrid"])
@pytest.mark.parametrize("chunk", [13, 0])
def test_model_forward_with_targets_equals_compute_loss(make, chunk):
    model = make().train()
    model.loss_chunk = chunk
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (2, 24), generator=g), torch.randint(0, 97, (2, 24), generator=g)
    mask = (torch.rand(2, 24, generator=g) > 0.3).float()
    params = [p for p in model.parameters()]
    logits = model(x)
    assert logits.shape == (2, 24, 97) and logits.dtype == torch.float32
    want = grads(compute_loss(logits, y, mask), *params)
    out = model(x, targets=y, loss_mask=mask)
    torch.testing.assert_close(out, compute_loss(logits, y, mask), rtol=1e-5, atol=1e-5)
    for p, got, w in zip(model.parameters(), grads(out, *params), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5, msg=lambda m, p=p: f"{p.shape}: {m}")


def test_model_default_is_chunked_and_compiles(monkeypatch):
    """The default (loss_chunk None) takes the chunked path, and torch.compile traces around it."""
    import trainer.loss

    calls = []
    chunked = trainer.loss.linear_cross_entropy
    monkeypatch.setattr(trainer.loss, "linear_cross_entropy", lambda *a: calls.append(a[-1]) or chunked(*a))
    model = tiny_dense().train()
    assert model.loss_chunk is None
    x, y = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    eager = model(x, targets=y)
    assert calls == [trainer.loss.LOSS_CHUNK] and trainer.loss.LOSS_CHUNK > 0
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x, targets=y), eager, rtol=1e-5, atol=1e-5)
