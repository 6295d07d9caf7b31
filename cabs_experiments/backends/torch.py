"""PyTorch trainer: the models of :mod:`.models` as ``nn.Sequential``, plain SGD,
and CABS runs through :class:`cabs_torch.CABSTrainer` (the core's step)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from cabs_torch import CABSTrainer
from torch import Tensor, nn

from cabs_core import CABSController, StepInfo

from ..data import Dataset
from .models import Conv, Dense, architecture

EVAL_CHUNK = 2000


def build_model(model: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """The layers of :func:`.models.architecture` (inputs: flat for mlp, NCHW for cnn)."""
    layers: list[nn.Module] = []
    h, w, c = image_shape
    features = h * w * c
    arch = architecture(model, image_shape, num_classes)
    flat = model == "mlp"
    for k, layer in enumerate(arch):
        if isinstance(layer, Conv):
            layers += [nn.Conv2d(c, layer.filters, layer.kernel, padding=layer.kernel // 2), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c, h, w = layer.filters, h // 2, w // 2
            features = c * h * w
        elif isinstance(layer, Dense):
            if not flat:
                layers.append(nn.Flatten())
                flat = True
            layers.append(nn.Linear(features, layer.units))
            features = layer.units
            if k < len(arch) - 1:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _per_example_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


class TorchTrainer:
    """:class:`cabs_experiments.backends.Trainer` for PyTorch (float32, on ``device``)."""

    def __init__(self, dataset: Dataset, model: str, device: str = "cpu") -> None:
        self.model_name, self.device = model, torch.device(device)
        self.image_shape, self.num_classes = dataset.image_shape, dataset.num_classes

        def prepare(x: np.ndarray) -> Tensor:
            t = torch.from_numpy(x)
            t = t.reshape(len(x), -1) if model == "mlp" else t.permute(0, 3, 1, 2)
            return t.contiguous().to(self.device)

        self.x = {"train": prepare(dataset.x_train), "test": prepare(dataset.x_test)}
        self.y = {"train": torch.from_numpy(dataset.y_train).to(self.device),
                  "test": torch.from_numpy(dataset.y_test).to(self.device)}
        self.reset(0)

    def reset(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = build_model(self.model_name, self.image_shape, self.num_classes).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_parameters = sum(p.numel() for p in self.params)

    def _batch(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device)
        return self.x["train"][idx], self.y["train"][idx]

    def sgd_step(self, indices: np.ndarray, lr: float) -> float:
        x, y = self._batch(indices)
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=-lr)
        return float(loss.detach())

    def cabs_run(self, controller: CABSController, seed: int) -> CABSRun:
        """A CABS run of this trainer's model (plain SGD at ``controller.lr``) on the
        training split, batches drawn by the core's sampler from ``seed``."""
        return CABSRun(CABSTrainer(self.model, _per_example_loss, controller,
                                   data=(self.x["train"], self.y["train"]), seed=seed))

    @torch.no_grad()
    def evaluate(self, split: str, indices: np.ndarray | None = None) -> tuple[float, float]:
        x, y = self.x[split], self.y[split]
        if indices is not None:
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.device)
            x, y = x[idx], y[idx]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for s in range(0, len(y), EVAL_CHUNK):
            out = self.model(x[s : s + EVAL_CHUNK])
            yy = y[s : s + EVAL_CHUNK]
            loss_sum += F.cross_entropy(out, yy, reduction="sum").to(torch.float64)
            correct += (out.argmax(1) == yy).sum()
        n = len(y)
        return float(loss_sum) / n, float(correct) / n


class CABSRun:
    """The driver's view of a :class:`cabs_torch.CABSTrainer` drawing its own batches."""

    def __init__(self, trainer: CABSTrainer) -> None:
        self.trainer = trainer

    @property
    def batch_size(self) -> int:
        """The decided size of the next step."""
        return self.trainer.batch_size

    @property
    def examples_seen(self) -> int:
        """Examples drawn by the sampler so far."""
        return self.trainer.examples_seen

    def step(self) -> StepInfo:
        """One CABS step (raises :class:`cabs_core.NonFiniteStatisticsError` under the default policy)."""
        return self.trainer.step()


def make_trainer(dataset: Dataset, model: str, threads: int | None = None) -> TorchTrainer:
    if threads is not None:
        torch.set_num_threads(threads)
    return TorchTrainer(dataset, model, "cuda" if torch.cuda.is_available() else "cpu")
