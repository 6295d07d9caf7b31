"""The conformance model zoo, framework-neutral: architectures, the portable
``.npz`` parameter layout, deterministic initial parameters and data.

Every backend builds the same four models from the same arrays (builders in
``cabs_conformance.zoo_torch``, ``zoo_jax``, ``zoo_tf``). The portable layout
is the one of JAX/Flax and Keras; ``docs/porting.md`` lists the conversions
(PyTorch: Linear weights transposed, Conv weights OIHW, images NCHW).

Layout, per parameter name:

- ``<layer>/kernel`` of a dense layer: ``(in, out)``; y = x @ kernel + bias.
- ``<layer>/kernel`` of a conv layer: ``(kh, kw, in, out)`` (HWIO), stride 1,
  padding SAME (2 on every side for 5x5).
- ``<layer>/bias``: ``(out,)``. ``<layer>/embedding``: ``(vocab, dim)``.
  ``<layer>/scale``, ``<layer>/bias`` of a layer norm: ``(dim,)``, eps = 1e-5.
- Images are NHWC; flattening after the last pooling is in NHWC order
  (a NCHW framework permutes to NHWC before flattening).
- Max pooling with window k and stride 2, SAME as in TensorFlow: the output
  has ceil(n / 2) positions and the padding (with -inf) goes to the end
  (bottom/right) first: 2x2 pads nothing on even sizes; 3x3 on 32 pads 1 at the end.

Loss of every model: softmax cross-entropy of the 10 logits with an integer label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LN_EPS = 1e-5


@dataclass(frozen=True)
class ModelSpec:
    """A model of the zoo: its input (shape of one example, dtype) and its parameters."""

    name: str
    input_shape: tuple[int, ...]
    input_kind: str  # "float" (images, vectors) or "tokens" (int ids in [0, vocab))
    params: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape), in a fixed order
    vocab: int = 0


def _dense(name: str, i: int, o: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return ((f"{name}/kernel", (i, o)), (f"{name}/bias", (o,)))


def _conv(name: str, k: int, i: int, o: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return ((f"{name}/kernel", (k, k, i, o)), (f"{name}/bias", (o,)))


MODELS: dict[str, ModelSpec] = {
    # dense 784-512-512-10, ReLU
    "mlp": ModelSpec(
        "mlp", (784,), "float", _dense("dense1", 784, 512) + _dense("dense2", 512, 512) + _dense("dense3", 512, 10)
    ),
    # the paper's MNIST CNN: conv5x5x32, pool 2, conv5x5x64, pool 2, dense 1024, dense 10
    "mnist_cnn": ModelSpec(
        "mnist_cnn",
        (28, 28, 1),
        "float",
        _conv("conv1", 5, 1, 32)
        + _conv("conv2", 5, 32, 64)
        + _dense("dense1", 7 * 7 * 64, 1024)
        + _dense("dense2", 1024, 10),
    ),
    # the paper's CIFAR-10 CNN: two conv5x5x64 blocks with 3x3 stride-2 pooling, dense 384, 192, 10
    "cifar_cnn": ModelSpec(
        "cifar_cnn",
        (32, 32, 3),
        "float",
        _conv("conv1", 5, 3, 64)
        + _conv("conv2", 5, 64, 64)
        + _dense("dense1", 8 * 8 * 64, 384)
        + _dense("dense2", 384, 192)
        + _dense("dense3", 192, 10),
    ),
    # tokens (8 of a vocabulary of 50) -> embedding 16 -> layer norm -> dense 32 per token, ReLU
    # -> mean over tokens -> dense 10
    "embed_ln": ModelSpec(
        "embed_ln",
        (8,),
        "tokens",
        (("embed/embedding", (50, 16)), ("norm/scale", (16,)), ("norm/bias", (16,)))
        + _dense("dense1", 16, 32)
        + _dense("dense2", 32, 10),
        vocab=50,
    ),
}


def init_params(model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic float64 parameters in the portable layout: Glorot-uniform
    kernels, small random biases (so that bias gradients are exercised),
    layer-norm scales near 1, embeddings N(0, 1)."""
    spec = MODELS[model]
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in spec.params:
        if name.endswith("/kernel"):
            fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
            if len(shape) == 4:
                fan_out = shape[0] * shape[1] * shape[3]
            lim = np.sqrt(6.0 / (fan_in + fan_out))
            out[name] = rng.uniform(-lim, lim, size=shape)
        elif name.endswith("/embedding"):
            out[name] = rng.normal(size=shape)
        elif name.endswith("/scale"):
            out[name] = 1.0 + 0.1 * rng.normal(size=shape)
        else:
            out[name] = 0.05 * rng.normal(size=shape)
    return out


def make_data(model: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n examples for ``model``: inputs (float64 NHWC / vectors, or int64 tokens)
    and int64 labels in [0, 10) from a fixed random teacher, so that a model can learn."""
    spec = MODELS[model]
    rng = np.random.default_rng(seed + 1000)
    if spec.input_kind == "tokens":
        x = rng.integers(0, spec.vocab, size=(n, *spec.input_shape)).astype(np.int64)
        y = (x.sum(axis=1) * 7 + x[:, 0]) % 10
        return x, y.astype(np.int64)
    x = rng.normal(size=(n, *spec.input_shape))
    teacher = np.random.default_rng(seed + 2000).normal(size=(int(np.prod(spec.input_shape)), 10))
    y = np.argmax(x.reshape(n, -1) @ teacher + 0.5 * rng.normal(size=(n, 10)), axis=1)
    return x, y.astype(np.int64)


def save_params(path: str | Path, params: dict[str, np.ndarray]) -> None:
    """Write parameters in the portable layout (an uncompressed .npz)."""
    np.savez(path, **params)


def load_params(path: str | Path, model: str) -> dict[str, np.ndarray]:
    """Read and check a portable .npz against the model's names and shapes."""
    spec = MODELS[model]
    with np.load(path) as f:
        got = {k: f[k] for k in f.files}
    want = dict(spec.params)
    missing, extra = set(want) - set(got), set(got) - set(want)
    if missing or extra:
        raise ValueError(f"{path}: parameters for {model!r} missing {sorted(missing)}, unexpected {sorted(extra)}")
    for k, shape in want.items():
        if got[k].shape != shape:
            raise ValueError(f"{path}: {k} has shape {got[k].shape}, expected {shape} (portable layout)")
    return got
