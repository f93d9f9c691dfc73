"""The seed notebook's CNN and the LightningModule that trains it."""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

NUM_CLASSES = 10


class ConvNet(nn.Module):
    """conv5x5(1->16)+BN+ReLU+pool, conv5x5(16->32)+BN+ReLU+pool, linear -> 10 logits; 29,034 parameters.

    Shapes: (N, 1, 28, 28) -> conv, padding 2 keeps 28x28 -> pool 14x14 -> conv keeps 14x14 -> pool 7x7,
    so the classifier sees 32 channels x 7 x 7 = 1568 features.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 7 * 7, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (N, 1, 28, 28) -> logits (N, 10); softmax of these are the probabilities."""
        return self.classifier(self.features(images).flatten(1))


class MNISTClassifier(L.LightningModule):
    """Trains :class:`ConvNet` with Adam and cross-entropy; accuracy from torchmetrics for every stage.

    Args:
        lr: Adam's learning rate (the peak rate under the one-cycle schedule).
        weight_decay: Adam's L2 penalty.
        lr_schedule: ``constant`` (the seed recipe) or ``onecycle`` (warm up, then anneal to ~0 by the
            last step of ``max_epochs``).
        label_smoothing: cross-entropy label smoothing; 0 is the seed's plain cross-entropy.
        channels_last: keep activations in NHWC, which oneDNN (CPU) and cuDNN run faster for these
            convolutions; the same arithmetic, so results match NCHW up to float rounding.
        compile: ``torch.compile`` the network (fuses BN/ReLU/pool; pays a one-off compile time).
    """

    def __init__(
        self,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        lr_schedule: Literal["constant", "onecycle"] = "constant",
        label_smoothing: ClosedUnitInterval = 0.0,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ConvNet()
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain ConvNet
        # One metric object per stage so their states never mix (validation runs inside fit).
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        # validate_args=False: the per-batch input checks cost a device sync and ~1% of a CPU step.
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False) for _ in range(3)
        )
        # Best val/acc so far; persistent so that a resumed run remembers it.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (N, 1, 28, 28) -> logits (N, 10)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        # forward() gives this batch's value for the per-step curve; the epoch value is the running mean.
        self.train_loss(loss.detach())
        self.train_acc.update(logits.detach(), labels)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the two sanity batches say nothing about the model
            return
        self.val_acc_best.update(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The logits go to callbacks' on_test_batch_end (the TestReport's confusion matrix and mistakes).
        return self._evaluate(batch, self.test_loss, self.test_acc, "test")

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch[0]).softmax(dim=1)
        return {"digit": probs.argmax(dim=1), "probs": probs}

    def _evaluate(
        self, batch: list[torch.Tensor], loss_metric: MeanMetric, acc_metric, stage: str
    ) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss_metric.update(F.cross_entropy(logits, labels))
        acc_metric.update(logits, labels)
        self.log(f"{stage}/loss", loss_metric, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc_metric, prog_bar=stage == "val")
        return logits

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
