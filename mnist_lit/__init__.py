"""mnist_lit: the seed notebook's MNIST CNN as a PyTorch Lightning project.

The core reads top to bottom in three files: model.py (the network and its LightningModule), data.py
(the LightningDataModule) and cli.py (LightningCLI). docs/architecture.md shows the rest.
"""
