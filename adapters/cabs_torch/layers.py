"""Per-layer rules of the fast path: from a layer's input ``a`` and the gradient
``b`` of the summed loss with respect to its output, the per-example squared
gradient norms ||g_i||^2 of the layer's parameters (docs/spec.md section 4, term of S).

Each rule turns one call of the layer (on a chunk of examples) into *pieces*:

- ``("lin", A, B)``: a weight shared over T positions, g_i = sum_t B_it A_it^T
  (A: (n, T, p), B: (n, T, q)); several calls concatenate along T.
- ``("emb", tokens, B)``: an embedding table, rows hit by equal ids add up.
- ``("dense", G)``: the per-example gradient itself, (n, ...), small (biases,
  normalisation affine parameters); several calls add up.

The norms of the pieces come from :mod:`cabs_core.per_example` (shared with the
JAX adapter), which picks the cheaper of the Gram form and the per-layer
per-example gradient. Nothing here materialises per-example gradients of the
whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight

from cabs_core.per_example import (
    embedding_linear_cross_sq_norms,
    embedding_sq_norms,
    gram_is_cheaper,
    linear_sq_norms,
)

Piece = tuple[Any, ...]
Pieces = dict[str, Piece]


def _trainable(p: Tensor | None) -> bool:
    return p is not None and p.requires_grad


def linear_pieces(mod: nn.Linear, a: Tensor, b: Tensor) -> Pieces:
    n = a.shape[0]
    A = a.reshape(n, -1, a.shape[-1])
    B = b.reshape(n, -1, b.shape[-1])
    out: Pieces = {}
    if _trainable(mod.weight):
        out["weight"] = ("lin", A, B)
    if _trainable(mod.bias):
        out["bias"] = ("dense", B.sum(1))
    return out


def linear_rank_one_sq_sum(mod: nn.Linear, a: Tensor, b: Tensor) -> Tensor:
    """sum_i ||g_i||^2 of a Linear layer on (m, p) inputs, called once: the
    rank-one formula ||a_i||^2 ||b_i||^2 for the weight plus ||b_i||^2 for the
    bias. Row sums of squares as ``vecdot(x, x)`` (a sum of products, no square root)."""
    bsq = torch.linalg.vecdot(b, b)
    if not _trainable(mod.weight):
        return bsq.sum()
    asq = torch.linalg.vecdot(a, a)
    return torch.dot(asq.add_(1) if _trainable(mod.bias) else asq, bsq)


def conv_pieces(mod: nn.Conv1d | nn.Conv2d, a: Tensor, b: Tensor) -> Pieces:
    """Conv1d/Conv2d (any stride, padding, dilation, groups, padding mode).

    The convolution is a linear map shared over T output positions. When the
    Gram form is cheaper (few positions, many channels) the input is unfolded
    and :func:`cabs_core.per_example.linear_sq_norms` applies; otherwise the
    layer's per-example weight gradients come from one grouped weight-gradient
    convolution with the examples as groups (no unfolded copy of the input),
    as a ``dense`` piece.
    """
    n = a.shape[0]
    padding = mod.padding
    if isinstance(padding, str) or mod.padding_mode != "zeros":
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        a = F.pad(a, mod._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(mod.kernel_size)
    g, c_in, c_out = mod.groups, a.shape[1], b.shape[1]
    kernel, stride, dilation = mod.kernel_size, mod.stride, mod.dilation
    t = math.prod(b.shape[2:])
    p, q = c_in // g * math.prod(kernel), c_out // g
    out: Pieces = {}
    if _trainable(mod.weight):
        if gram_is_cheaper(t, p, q):
            a2, b2 = a, b
            if a.dim() == 3:  # Conv1d as Conv2d of height 1
                a2, b2 = a.unsqueeze(2), b.unsqueeze(2)
                kernel, stride, dilation = ((1, *v) for v in (kernel, stride, dilation))
                padding = (0, *padding)
            cols = F.unfold(a2, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, C k, T)
            A = cols.reshape(n, g, p, t).transpose(2, 3).reshape(n * g, t, p)
            B = b2.reshape(n, g, q, t).transpose(2, 3).reshape(n * g, t, q)
            out["weight"] = ("lin", A, B)
        else:
            weight_grad = conv1d_weight if a.dim() == 3 else conv2d_weight
            gw = weight_grad(
                a.reshape(1, n * c_in, *a.shape[2:]),
                (n * c_out, c_in // g, *mod.kernel_size),
                b.reshape(1, n * c_out, *b.shape[2:]),
                stride, padding, dilation, n * g,
            )
            out["weight"] = ("dense", gw.reshape(n, -1))
    if _trainable(mod.bias):
        out["bias"] = ("dense", b.reshape(n, c_out, t).sum(2))
    return out


def embedding_pieces(mod: nn.Embedding, a: Tensor, b: Tensor) -> Pieces:
    n = a.shape[0]
    tokens = a.reshape(n, -1)
    B = b.reshape(n, tokens.shape[1], -1)
    if mod.padding_idx is not None:  # the padding row gets no gradient
        B = B * (tokens != mod.padding_idx).unsqueeze(-1).to(B.dtype)
    return {"weight": ("emb", tokens, B)} if _trainable(mod.weight) else {}


def _affine_pieces(mod: nn.Module, xhat: Tensor, b: Tensor, channel_dims: int, channels_last: bool) -> Pieces:
    """Per-example gradients of an elementwise affine y = xhat * weight + bias:
    sum of b * xhat (weight) and of b (bias) over the non-parameter axes."""
    n = b.shape[0]
    if channels_last:  # parameters over the trailing axes (LayerNorm, RMSNorm)
        d = 1
        for s in b.shape[b.dim() - channel_dims :]:
            d *= s
        bw, bb = (b * xhat).reshape(n, -1, d).sum(1), b.reshape(n, -1, d).sum(1)
    else:  # parameters over axis 1 (GroupNorm, BatchNorm in eval mode)
        c = b.shape[1]
        bw, bb = (b * xhat).reshape(n, c, -1).sum(2), b.reshape(n, c, -1).sum(2)
    out: Pieces = {}
    if _trainable(getattr(mod, "weight", None)):
        out["weight"] = ("dense", bw)
    if _trainable(getattr(mod, "bias", None)):
        out["bias"] = ("dense", bb)
    return out


def layer_norm_pieces(mod: nn.LayerNorm, a: Tensor, b: Tensor) -> Pieces:
    xhat = F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
    return _affine_pieces(mod, xhat, b, len(mod.normalized_shape), True)


def rms_norm_pieces(mod: Any, a: Tensor, b: Tensor) -> Pieces:
    xhat = F.rms_norm(a, mod.normalized_shape, None, mod.eps)
    return _affine_pieces(mod, xhat, b, len(mod.normalized_shape), True)


def group_norm_pieces(mod: nn.GroupNorm, a: Tensor, b: Tensor) -> Pieces:
    xhat = F.group_norm(a, mod.num_groups, None, None, mod.eps)
    return _affine_pieces(mod, xhat, b, 1, False)


def batch_norm_eval_pieces(mod: nn.modules.batchnorm._BatchNorm, a: Tensor, b: Tensor) -> Pieces:
    """BatchNorm in eval mode with running statistics: a per-channel affine map
    of each example alone."""
    shape = (1, -1) + (1,) * (a.dim() - 2)
    assert mod.running_mean is not None and mod.running_var is not None  # eval mode with running stats
    xhat = (a - mod.running_mean.reshape(shape)) * torch.rsqrt(mod.running_var.reshape(shape) + mod.eps)
    return _affine_pieces(mod, xhat.to(b.dtype), b, 1, False)


Rule = Callable[[Any, Tensor, Tensor], Pieces]

#: The module types of the fast path, and the parameter names each one owns.
RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear_pieces,
    nn.Conv1d: conv_pieces,
    nn.Conv2d: conv_pieces,
    nn.Embedding: embedding_pieces,
    nn.LayerNorm: layer_norm_pieces,
    nn.GroupNorm: group_norm_pieces,
    nn.BatchNorm1d: batch_norm_eval_pieces,
    nn.BatchNorm2d: batch_norm_eval_pieces,
    nn.BatchNorm3d: batch_norm_eval_pieces,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = rms_norm_pieces


def rule_for(mod: nn.Module) -> Rule | None:
    """The rule of ``mod``'s exact type (subclasses may change the forward: not
    supported), or None. Refuses configurations the formulas do not cover."""
    rule = RULES.get(type(mod))
    if rule is None:
        return None
    if isinstance(mod, nn.Embedding) and (mod.scale_grad_by_freq or mod.sparse):
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and getattr(mod, "transposed", False):
        return None
    refuses = getattr(rule, "refuses", None)  # a rule that declines some configurations (recurrent.py)
    if refuses is not None and refuses(mod):
        return None
    return rule


def combine_pieces(calls: list[Pieces]) -> Pieces:
    """Merge the pieces of several calls of one layer (a layer used twice in a
    forward pass): the per-example gradient is the sum over the calls."""
    if len(calls) == 1:
        return calls[0]
    out: Pieces = {}
    for name in calls[0]:
        kind = calls[0][name][0]
        parts = [c[name] for c in calls]
        if kind == "dense":
            total = parts[0][1]
            for p in parts[1:]:
                total = total + p[1]
            out[name] = ("dense", total)
        else:  # "lin" / "emb": concatenate the positions
            out[name] = (kind, torch.cat([p[1] for p in parts], 1), torch.cat([p[2] for p in parts], 1))
    return out


def piece_sq_norm_sum(piece: Piece) -> Tensor:
    """sum over the examples of ||g_i||^2 for one piece, as a 0-d tensor.

    ``lin`` pieces of grouped convolutions hold n * groups rows: the groups'
    weight blocks are disjoint, so their squared norms simply add.
    """
    kind = piece[0]
    if kind == "dense":
        g = piece[1]
        return g.pow(2).sum()
    if kind == "lin":
        return linear_sq_norms(piece[1], piece[2]).sum()
    if kind == "emb":
        return embedding_sq_norms(piece[1], piece[2]).sum()
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- tied parameters, accounting


def piece_per_example(piece: Piece, n: int, shape: tuple[int, ...]) -> Tensor:
    """The per-example gradients of one piece in the parameter's layout, (n, numel).

    ``lin`` pieces of grouped convolutions hold n * groups rows (example-major),
    whose (q, p) blocks are the weight's groups in order."""
    kind = piece[0]
    if kind == "dense":
        return piece[1].reshape(n, -1)
    if kind == "lin":
        return torch.matmul(piece[2].transpose(1, 2), piece[1]).reshape(n, -1)
    if kind == "emb":
        tokens, e = piece[1], piece[2]
        out = torch.zeros((n, shape[0], e.shape[2]), dtype=e.dtype, device=e.device)
        out.scatter_add_(1, tokens.long().unsqueeze(-1).expand(e.shape), e)
        return out.reshape(n, -1)
    raise AssertionError(kind)


def piece_grad_sum(piece: Piece, n: int, shape: tuple[int, ...]) -> Tensor:
    """The piece's gradient summed over its n examples, in the parameter's shape:
    what the accounting check compares with the parameter's full gradient."""
    kind = piece[0]
    if kind == "dense":
        return piece[1].sum(0).reshape(shape)
    if kind == "lin":
        A, B = piece[1], piece[2]
        r, t = A.shape[0] // n, A.shape[1]
        g = torch.einsum("nrtq,nrtp->rqp", B.reshape(n, r, t, -1), A.reshape(n, r, t, -1))
        return g.reshape(shape)
    if kind == "emb":
        tokens, e = piece[1], piece[2]
        out = torch.zeros((shape[0], e.shape[2]), dtype=e.dtype, device=e.device)
        return out.index_add_(0, tokens.reshape(-1).long(), e.reshape(-1, e.shape[2])).reshape(shape)
    raise AssertionError(kind)


def tied_sq_norm_sum(pieces: list[Piece], n: int, shape: tuple[int, ...]) -> Tensor:
    """sum_i ||sum_u g_i^u||^2 over the uses u of one parameter (its pieces from
    several layers or calls): each use's own term plus twice the cross terms.

    Uses of one kind concatenate their positions (as for a layer called twice);
    an embedding lookup and an output projection of the same table meet through
    :func:`cabs_core.per_example.embedding_linear_cross_sq_norms` (a gather of
    the output gradient at the ids, no one-hot). Any other mix (a ``dense``
    piece, grouped convolutions) is summed as per-example gradients."""
    if len(pieces) == 1:
        return piece_sq_norm_sum(pieces[0])
    kinds = {p[0] for p in pieces}
    if "dense" in kinds or any(p[1].shape[0] != n for p in pieces):
        total = piece_per_example(pieces[0], n, shape)
        for p in pieces[1:]:
            total = total + piece_per_example(p, n, shape)
        return total.pow(2).sum()
    lin = [{"w": p} for p in pieces if p[0] == "lin"]
    emb = [{"w": p} for p in pieces if p[0] == "emb"]
    merged = [combine_pieces(uses)["w"] for uses in (lin, emb) if uses]
    total = piece_sq_norm_sum(merged[0])
    if len(merged) == 2:  # merged[0] is the projection, merged[1] the lookup
        total = total + piece_sq_norm_sum(merged[1])
        total = total + 2 * embedding_linear_cross_sq_norms(merged[1][1], merged[1][2], merged[0][1],
                                                            merged[0][2]).sum()
    return total


from . import recurrent as _recurrent  # noqa: E402,F401  (registers nn.LSTM / nn.GRU / nn.RNN in RULES)
