"""The models of the experiment, described once and built by every backend.

- ``mlp``: flattened image -> Dense 100 -> ReLU -> Dense 100 -> ReLU -> Dense 10
  (for digits and MNIST).
- ``cnn``: the paper's kind of network. On one-channel images (MNIST) the
  TensorFlow "Deep MNIST" tutorial network without dropout (as far as we know
  the paper's MNIST network):
  conv 5x5x32 -> ReLU -> max-pool 2 -> conv 5x5x64 -> ReLU -> max-pool 2 ->
  Dense 1024 -> ReLU -> Dense 10. On three-channel images (CIFAR-10, SVHN) the
  TensorFlow CIFAR-10 tutorial's network without local response
  normalisation: conv 5x5x64 -> ReLU -> max-pool 2 -> conv 5x5x64 -> ReLU ->
  max-pool 2 -> Dense 384 -> ReLU -> Dense 192 -> ReLU -> Dense 10.
  Convolutions use "same" padding, pooling 2x2 with stride 2 (floor).
  The paper's exact architectures may differ in details (see docs/experiments.md).

No BatchNorm and no dropout: CABS needs per-example gradients of examples
that do not interact, and the comparison is about the optimiser.
"""

from __future__ import annotations

from typing import NamedTuple

MODELS = ("mlp", "cnn")
MLP_HIDDEN = (100, 100)


class Conv(NamedTuple):
    filters: int
    kernel: int


class Dense(NamedTuple):
    units: int


Layer = Conv | Dense


def architecture(model: str, image_shape: tuple[int, int, int], num_classes: int = 10) -> list[Layer]:
    """The layers of ``model`` for images of ``image_shape`` (H, W, C). Every Conv is
    followed by ReLU and 2x2 max-pooling, every Dense but the last by ReLU; the
    image is flattened before the first Dense."""
    if model == "mlp":
        return [*(Dense(h) for h in MLP_HIDDEN), Dense(num_classes)]
    if model == "cnn":
        h, w, c = image_shape
        if min(h, w) < 4:
            raise ValueError(f"the cnn pools twice by 2: images of {h}x{w} are too small")
        layers: list[Layer] = [Conv(32, 5), Conv(64, 5), Dense(1024)] if c == 1 else [
            Conv(64, 5), Conv(64, 5), Dense(384), Dense(192)]
        return [*layers, Dense(num_classes)]
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def default_model(dataset: str) -> str:
    """mlp for digits, MNIST and MNIST-1D; the paper's cnn for mnist-5k, CIFAR-10 and SVHN."""
    return "mlp" if dataset in ("digits", "mnist", "mnist1d") else "cnn"
