"""mnist_lit: the seed notebook's MNIST CNN as a PyTorch Lightning project."""

from mnist_lit.data import MNISTDataModule
from mnist_lit.model import ConvNet, MNISTClassifier

__all__ = ["ConvNet", "MNISTClassifier", "MNISTDataModule"]
