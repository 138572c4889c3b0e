"""fedmed: federated learning for adversarially robust medical-image classification."""

__version__ = "0.1.0"
