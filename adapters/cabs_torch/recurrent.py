"""Fast-path rule of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (issue 20, item 3).

A recurrent layer applies its weights at every time step: the gate
pre-activations are ``gi_t = W_ih x_t + b_ih`` and ``gh_t = W_hh h_{t-1} + b_hh``,
so the per-example gradients are sums over the time steps,

    g_i(W_ih) = sum_t dgi_it x_it^T,   g_i(W_hh) = sum_t dgh_it h_i,t-1^T,
    g_i(b_ih) = sum_t dgi_it,          g_i(b_hh) = sum_t dgh_it,

``lin`` and ``dense`` pieces of :mod:`.layers` (the Gram form over time steps of
a layer called several times). The fused kernel hides x_t of the upper layers,
h_{t-1} and the gate gradients dgi, dgh. So:

- in the statistics pass the module runs as usual (fused kernel, its own
  backward: ``grad_sum`` is the module's gradient); :meth:`RecurrentRule.pack`
  turns its inputs ``(x, h_0[, c_0])`` into one example-major tensor ``a`` and
  its outputs ``(output, h_n[, c_n])`` into one example-major tensor ``P``
  whose views the model then receives, so that the fast path's capture sees
  one input and one output gradient ``b`` per call, with the example axis
  first (time-major ``batch_first=False`` tensors are transposed here);
- the rule (:meth:`RecurrentRule.__call__`) recomputes the layer from ``a``
  with an unrolled functional LSTM/GRU/RNN (PyTorch's equations and gate
  order, as documented in ``nn.LSTM``/``nn.GRU``/``nn.RNN``), back-propagates
  ``b`` through it, and reads x_t, h_{t-1}, dgi_t and dgh_t off that graph.

On a probe the unrolled outputs are compared with the fused module's (a
mismatch refuses the fast path); the probe's accounting check (each weight's
gradient rebuilt from the pieces equals the fused backward's) and the fast
vs. loop comparison of S then cover the rule like any other.

Refused (the generic path is exact for them): ``proj_size > 0``, dropout
between layers (the recomputation cannot replay the random mask), subclasses,
``PackedSequence`` and unbatched inputs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from cabs_core.exactness import UnsupportedModelError, check_close, rtol_for

from .layers import RULES, Pieces

#: scratch elements of the rule's recomputation per chunk of examples (the generic path's default chunk).
#: Each chunk pays one Python-level pass over the time steps: with 2**22, an LSTM(64, 128) over 32 steps
#: at batch 64 ran in 3 chunks and the rule took 243 ms instead of about 110 ms.
CHUNK_ELEMENTS = 2**25

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _dims(mod: nn.RNNBase) -> tuple[int, int, int, int]:
    """(layers, directions, hidden size, states: 2 for an LSTM's (h, c), else 1)."""
    return mod.num_layers, 2 if mod.bidirectional else 1, mod.hidden_size, 2 if mod.mode == "LSTM" else 1


def _cell(mode: str, gi: Tensor, gh: Tensor | None, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One time step (the equations of the nn.LSTM / nn.GRU / nn.RNN docstrings, their gate order).
    GRU: gi = W_ih x + b_ih and gh = W_hh h + b_hh; LSTM and RNN: gi is the whole pre-activation
    W_ih x + b_ih + W_hh h + b_hh and gh is None."""
    if mode == "LSTM":
        i, f, _, o = torch.sigmoid(gi).chunk(4, 1)  # one sigmoid over all gates (fewer ops per step)
        hidden = h.shape[1]
        c = torch.addcmul(f * c, i, torch.tanh(gi[:, 2 * hidden : 3 * hidden]))
        return o * torch.tanh(c), c
    if mode == "GRU":
        assert gh is not None
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    return (torch.tanh(gi) if mode == "RNN_TANH" else torch.relu(gi)), None


Steps = list[tuple[str, Tensor, list[Tensor], Tensor | None, list[Tensor]]]


def _unrolled(mod: nn.RNNBase, xb: Tensor, states: list[Tensor], weights: dict[str, Tensor]) -> tuple[Tensor, Steps]:
    """The module's outputs packed like :meth:`RecurrentRule.pack`'s ``P`` from
    example-major inputs xb (n, T, I) and initial states (n, L*D, H), and per
    layer and direction (suffix, layer input, h_{t-1} per step, gi (n, T, G) or
    None, per step gh or, for LSTM and RNN, the whole pre-activation, whose
    gradient is then both dgi and dgh)."""
    layers, dirs, _, _ = _dims(mod)
    n, t_len = xb.shape[:2]
    lstm, gru = mod.mode == "LSTM", mod.mode == "GRU"
    layer_in = xb
    finals: list[list[Tensor]] = [[] for _ in states]
    steps: Steps = []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = weights["weight_ih" + sfx], weights["weight_hh" + sfx]
            b_ih, b_hh = weights.get("bias_ih" + sfx), weights.get("bias_hh" + sfx)
            gi = F.linear(layer_in, w_ih, b_ih)  # all time steps at once
            if not gru and b_hh is not None:
                gi = gi + b_hh
            gi_steps = gi.unbind(1)  # one backward node for all steps (gi[:, t] would zero-fill gi per step)
            h = states[0][:, layer * dirs + d]
            c = states[1][:, layer * dirs + d] if lstm else None
            hs: list[Any] = [None] * t_len
            prev: list[Any] = [None] * t_len
            ghs: list[Any] = [None] * t_len
            for t in (range(t_len) if d == 0 else range(t_len - 1, -1, -1)):
                prev[t] = h
                if gru:
                    ghs[t] = F.linear(h, w_hh, b_hh)
                    h, c = _cell(mod.mode, gi_steps[t], ghs[t], h, c)
                else:
                    ghs[t] = torch.addmm(gi_steps[t], h, w_hh.t())
                    h, c = _cell(mod.mode, ghs[t], None, h, c)
                hs[t] = h
            outs.append(torch.stack(hs, 1))
            finals[0].append(h)
            if lstm:
                finals[1].append(c)
            steps.append((sfx, layer_in, prev, gi if gru else None, ghs))
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, 2)
    packed = torch.cat([layer_in.reshape(n, -1), *(torch.stack(f, 1).reshape(n, -1) for f in finals)], 1)
    return packed, steps


class RecurrentRule:
    """The fast path's rule of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (see the module's docstring).

    Besides ``rule(mod, a, b) -> pieces`` it has ``pack`` (called by the fast
    path's capture on the module's inputs and outputs), ``refuses`` (the
    configurations it declines, with the reason) and ``param_names``."""

    @staticmethod
    def refuses(mod: nn.Module) -> str | None:
        """Why this module is not covered, or None."""
        if getattr(mod, "proj_size", 0) > 0:
            return "proj_size > 0 (LSTM with projections) is not covered by the recurrent rule"
        if mod.dropout > 0 and mod.num_layers > 1:
            return ("dropout between its layers: the recurrent rule recomputes the layers and cannot "
                    "replay the random mask")
        return None

    @staticmethod
    def param_names(mod: nn.Module) -> set[str]:
        return set(mod._flat_weights_names)

    @staticmethod
    def _unpack(mod: nn.RNNBase, a: Tensor) -> tuple[Tensor, list[Tensor]]:
        layers, dirs, hidden, n_states = _dims(mod)
        n, size = a.shape[0], layers * dirs * hidden
        t_len = (a.shape[1] - n_states * size) // mod.input_size
        x_len = t_len * mod.input_size
        xb = a[:, :x_len].reshape(n, t_len, mod.input_size)
        states = [a[:, x_len + j * size : x_len + (j + 1) * size].reshape(n, layers * dirs, hidden)
                  for j in range(n_states)]
        return xb, states

    def pack(self, mod: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
             check: bool) -> tuple[Tensor, Tensor, Any]:
        """(a, P, the module's outputs as views of P): ``a`` the inputs, ``P`` the
        outputs, each as one (n, ...) tensor. ``check`` (a probe): the unrolled
        recomputation must reproduce the fused module's outputs."""
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        name = type(mod).__name__
        if isinstance(x, PackedSequence):
            raise UnsupportedModelError(
                f"{name} called on a PackedSequence: the recurrent fast rule covers padded (n, T, ...) "
                f"batches only. method='generic' is exact for any model; method='auto' falls back to it.",
                layer=name, reason="PackedSequence input")
        if x.dim() != 3:
            raise UnsupportedModelError(
                f"{name} called on an unbatched input of shape {tuple(x.shape)}: the fast path needs the "
                f"example axis. method='generic' is exact for any model.", layer=name, reason="unbatched input")
        layers, dirs, hidden, n_states = _dims(mod)
        xb = x if mod.batch_first else x.transpose(0, 1)
        n, t_len = xb.shape[:2]
        if hx is None:
            init = [xb.new_zeros(n, layers * dirs * hidden)] * n_states
        else:
            init = [s.transpose(0, 1).reshape(n, -1) for s in ((hx,) if isinstance(hx, Tensor) else hx)]
        a = torch.cat([xb.reshape(n, -1), *init], 1).detach()
        output, final = out
        finals = (final,) if isinstance(final, Tensor) else tuple(final)
        ob = output if mod.batch_first else output.transpose(0, 1)
        packed = torch.cat([ob.reshape(n, -1), *(s.transpose(0, 1).reshape(n, -1) for s in finals)], 1)
        if check:
            self._check(mod, a, packed.detach(), name)
        off, size = t_len * dirs * hidden, layers * dirs * hidden
        views = [packed[:, :off].reshape(n, t_len, dirs * hidden)]
        views[0] = (views[0] if mod.batch_first else views[0].transpose(0, 1)).contiguous()
        states = [packed[:, off + j * size : off + (j + 1) * size].reshape(n, layers * dirs, hidden)
                  .transpose(0, 1).contiguous() for j in range(n_states)]
        return a, packed, (views[0], tuple(states) if n_states == 2 else states[0])

    def _check(self, mod: nn.RNNBase, a: Tensor, ref: Tensor, name: str) -> None:
        """The unrolled recomputation, as the rule runs it (autocast off), reproduces the fused
        module's packed outputs ``ref``; under autocast within the autocast dtype's tolerance."""
        device, rtol = ref.device.type, rtol_for(str(ref.dtype))
        autocast = device in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device)
        if autocast:
            rtol = max(rtol, rtol_for(str(torch.get_autocast_dtype(device))))
        with torch.no_grad(), torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            weights = {k: w.detach().to(a.dtype) for k, w in zip(mod._flat_weights_names, mod._flat_weights)}
            again, _ = _unrolled(mod, *self._unpack(mod, a), weights)
        check_close(f"the unrolled {mod.mode} recomputation against the module's own output",
                    float(torch.linalg.vector_norm(again.double() - ref.double())),
                    float(torch.linalg.vector_norm(ref.double())), rtol, layer=name)

    def __call__(self, mod: nn.RNNBase, a: Tensor, b: Tensor) -> Pieces:
        """The pieces of every weight and bias of ``mod`` for the examples of (a, b)."""
        layers, dirs, hidden, _ = _dims(mod)
        t_len = (a.shape[1] - _dims(mod)[3] * layers * dirs * hidden) // mod.input_size
        width = max(mod.input_size, dirs * hidden)
        per_example = max(1, layers * dirs * t_len * (8 * _GATES[mod.mode] * hidden + 4 * width))
        step = max(1, CHUNK_ELEMENTS // per_example)
        parts = [self._pieces(mod, a[s : s + step], b[s : s + step]) for s in range(0, a.shape[0], step)]
        if len(parts) == 1:
            return parts[0]
        return {k: (parts[0][k][0], *(torch.cat([p[k][j] for p in parts]) for j in range(1, len(parts[0][k]))))
                for k in parts[0]}

    def _pieces(self, mod: nn.RNNBase, a: Tensor, b: Tensor) -> Pieces:
        xb, states = self._unpack(mod, a)
        params = dict(zip(mod._flat_weights_names, mod._flat_weights))
        with torch.enable_grad():  # the fast path calls rules inside backward, where grad mode is off
            weights = {k: w.detach().to(a.dtype).requires_grad_() for k, w in params.items()}
            packed, steps = _unrolled(mod, xb, states, weights)
            wrt = [s[3] for s in steps if s[3] is not None] + [g for s in steps for g in s[4]]
            grads = torch.autograd.grad(packed, wrt, grad_outputs=b.to(packed.dtype), allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        n_gi = sum(s[3] is not None for s in steps)
        d_gi, d_gh = grads[:n_gi], grads[n_gi:]
        out: Pieces = {}
        t_len = xb.shape[1]
        for k, (sfx, layer_in, prev, gi, _) in enumerate(steps):
            dgh = torch.stack(d_gh[k * t_len : (k + 1) * t_len], 1)
            dgi = dgh if gi is None else d_gi[k]  # LSTM, RNN: one pre-activation, the same gradient
            for kind, A, B in (("ih", layer_in, dgi), ("hh", torch.stack(prev, 1), dgh)):
                w, bias = params[f"weight_{kind}{sfx}"], params.get(f"bias_{kind}{sfx}")
                if w.requires_grad:
                    out[f"weight_{kind}{sfx}"] = ("lin", A.detach(), B)
                if bias is not None and bias.requires_grad:
                    out[f"bias_{kind}{sfx}"] = ("dense", B.sum(1))
        return out


RULE = RecurrentRule()
RULES.update({nn.LSTM: RULE, nn.GRU: RULE, nn.RNN: RULE})
