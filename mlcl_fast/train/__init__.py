"""Training, evaluation and the study: data loaders, MLP models, protocols, metrics, plots.

Needs the `train` extra (scikit-learn, scipy, tqdm, matplotlib, liac-arff)."""
from .api import train
from .data import Dataset, DatasetError, from_arrays, load_arff, load_dataset, load_npz, load_svmlight
from .metrics import evaluate, tune_thresholds
from .protocols import TrainConfig, run

__all__ = ["train", "Dataset", "DatasetError", "from_arrays", "load_arff", "load_dataset", "load_npz",
           "load_svmlight", "evaluate", "tune_thresholds", "TrainConfig", "run"]
