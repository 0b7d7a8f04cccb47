"""ois-deploy: OIS (order-aware interactive segmentation) from PyTorch to fast, verified inference."""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402


def __getattr__(name):
    # Predictor pulls in OpenCV (and the backend it opens): import it only when asked for.
    if name == "Predictor":
        from .runtime.predictor import Predictor

        return Predictor
    raise AttributeError(name)


__all__ = ["Predictor", "UserError", "__version__"]
