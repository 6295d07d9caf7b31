"""cabs_experiments: the paper's experiment as a command, CABS against tuned SGD.

``python -m cabs_experiments`` (console script ``cabs-experiment``) trains a
model with CABS and with SGD baselines on one data set and one backend, and
writes a JSONL log, PNG figures and a markdown summary (docs/experiments.md).

- :mod:`.data`: digits (shipped), MNIST / CIFAR-10 / SVHN from local files;
- :mod:`.run`: the methods, the framework-free driver, the command line;
- :mod:`.backends`: per-framework trainers behind one protocol;
- :mod:`.report`: log, figures, summary.
"""

from .data import DATASETS, DataError, Dataset, load_dataset
from .report import Summary, read_jsonl, summarize, write_report
from .run import ExperimentConfig, Method, main, run_experiment

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "ExperimentConfig",
    "Method",
    "Summary",
    "load_dataset",
    "main",
    "read_jsonl",
    "run_experiment",
    "summarize",
    "write_report",
]
