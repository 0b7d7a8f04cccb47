"""Running exported or reference models: the Runner interface, one module per backend, the
registry that opens them, and the Predictor. Nothing here imports PyTorch unless a torch
backend is opened."""

from .base import Runner
from .predictor import Prediction, Predictor
from .registry import BACKENDS, RunnerSpec, open_runner

__all__ = ["BACKENDS", "Prediction", "Predictor", "Runner", "RunnerSpec", "open_runner"]
