"""The seed notebook's CNN and the LightningModule that trains it."""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

NUM_CLASSES = 10


class ConvNet(nn.Module):
    """conv5x5(1->16)+BN+ReLU+pool, conv5x5(16->32)+BN+ReLU+pool, linear -> 10 logits; 29,034 parameters.

    Shapes: (N, 1, 28, 28) -> conv, padding 2 keeps 28x28 -> pool 14x14 -> conv keeps 14x14 -> pool 7x7,
    so the classifier sees 32 channels x 7 x 7 = 1568 features.

    Each block max-pools before its ReLU. The two commute (ReLU is monotone: the rectified maximum is the
    maximum of the rectified values, and the gradient reaches the same element), so outputs and
    gradients are bit-identical to the notebook's conv, BN, ReLU, pool order (tests/test_model.py checks
    it), while the ReLU and its backward touch a quarter of the values (docs/performance.md). The
    parameters and checkpoint keys are the same in either order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.BatchNorm2d(16),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.BatchNorm2d(32),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 7 * 7, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (N, 1, 28, 28) -> logits (N, 10); softmax of these are the probabilities."""
        return self.classifier(self.features(images).flatten(1))

    def folded(self) -> nn.Sequential:
        """This network for evaluation (it must be in eval mode): the same function up to float rounding,
        with each BatchNorm folded into the convolution before it.

        Once training is over a BatchNorm is a fixed per-channel scale and shift (its running statistics),
        which the convolution's weights and bias can absorb: evaluation then skips a pass over each block's
        largest activations (docs/performance.md). Built from the current weights on every call, so it is
        never stale; it shares no parameters with this network.
        """
        conv1, norm1, pool1, relu1, conv2, norm2, pool2, relu2 = self.features
        return nn.Sequential(
            fuse_conv_bn_eval(conv1, norm1), pool1, relu1,
            fuse_conv_bn_eval(conv2, norm2), pool2, relu2,
            nn.Flatten(1), self.classifier,
        )  # fmt: skip


class MNISTClassifier(L.LightningModule):
    """Trains a network (the seed's :class:`ConvNet` by default) with Adam and cross-entropy; accuracy from
    torchmetrics for every stage. LightningCLI's ``optimizer:`` setting, where given, replaces Adam and
    ``lr``, ``weight_decay`` and ``lr_schedule`` (its own ``configure_optimizers``).

    Args:
        net: the network, images (N, 1, 28, 28) -> logits (N, 10); in a recipe ``net: {class_path: ...,
            init_args: {...}}``, which checkpoints record as plain data (a network built in Python is
            not recorded: test or export of its checkpoints rebuilds a ConvNet, and refuses the weights).
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
        net: nn.Module | None = None,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        lr_schedule: Literal["constant", "onecycle"] = "constant",
        label_smoothing: ClosedUnitInterval = 0.0,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # The seed's hyperparameters stay as they were (no `net: null`); LightningCLI hands over a recipe's
        # net as its class_path and init_args, which test, export and serve rebuild it from.
        self.save_hyperparameters(ignore=None if net is not None else "net")
        if not isinstance(self.hparams.get("net", {}), dict):  # an object: no torch.load(weights_only)
            self.save_hyperparameters(ignore="net")
        self.net = ConvNet() if net is None else net
        # One image, as a loader hands it out: the model summary then shows each layer's input and
        # output sizes and the network's FLOPs.
        self.example_input_array = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain ConvNet
        # One metric object per stage so their states never mix (validation runs inside fit). They are
        # updated every step and computed once per epoch: logging a Metric object itself makes Lightning
        # move it to the device on every self.log call.
        # nan_strategy="disable": the default NaN check reads the loss back to the host (two GPU syncs a
        # step); a NaN loss is StopOnDivergence's business (faults.py), and would show in the mean anyway.
        self.train_loss, self.val_loss, self.test_loss = (
            MeanMetric(nan_strategy="disable") for _ in range(3)
        )
        # validate_args=False: the per-batch input checks cost a device sync.
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(NUM_CLASSES, average="micro", validate_args=False) for _ in range(3)
        )
        # Persistent (saved in checkpoints): a run resumed mid-epoch goes on with the epoch's running
        # train metrics, and with the best val/acc so far.
        self.val_acc_best = MaxMetric()
        for metric in (self.train_loss, self.train_acc, self.val_acc_best):
            metric.persistent(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (N, 1, 28, 28) -> logits (N, 10)."""
        return self.net(self._layout(images))

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of :meth:`forward` for validation, test and predict: a network that has ``folded()``
        runs with its BatchNorms folded (:meth:`ConvNet.folded`; folding costs well under a millisecond,
        a batch far more)."""
        net = self.net.folded() if hasattr(self.net, "folded") else self.net
        return net(self._layout(images))

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def on_train_epoch_start(self) -> None:
        # Not called when a run resumes mid-epoch: the restored running metrics carry on.
        self.train_loss.reset()
        self.train_acc.reset()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), labels)
        # This batch's loss for the per-step curve and the progress bar, only on the steps the logger writes
        # (Lightning's rule: every --trainer.log_every_n_steps optimizer steps) and the epoch's last, since
        # each self.log call has a cost. A CPU copy, because Lightning re-reads progress-bar values after
        # every batch until the next log: from a GPU tensor, that read would wait for the GPU every step.
        logged_step = (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0
        if logged_step or batch_idx + 1 == self.trainer.num_training_batches:
            self.log("train/loss_step", loss.detach().cpu(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss_epoch", self.train_loss.compute())
        self.log("train/acc", self.train_acc.compute())

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        val_acc = self._log_epoch("val", self.val_loss, self.val_acc)
        if self.trainer.sanity_checking:  # the two sanity batches say nothing about the model
            return
        self.val_acc_best.update(val_acc)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The logits go to callbacks' on_test_batch_end (the TestReport's confusion matrix and mistakes).
        return self._evaluate(batch, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss, self.test_acc)

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.evaluation_logits(batch[0]).softmax(dim=1)
        return {"digit": probs.argmax(dim=1), "probs": probs}

    def _evaluate(self, batch: list[torch.Tensor], loss_metric: MeanMetric, acc_metric) -> torch.Tensor:
        images, labels = batch
        logits = self.evaluation_logits(images)
        # Per image, so the mean is over every image whatever the batches or DDP shares (MeanMetric's
        # weight= is ignored under nan_strategy="disable").
        loss_metric.update(F.cross_entropy(logits, labels, reduction="none"))
        acc_metric.update(logits, labels)
        return logits

    def _log_epoch(self, stage: str, loss_metric: MeanMetric, acc_metric) -> torch.Tensor:
        """Log the stage's loss and accuracy over the whole epoch (all ranks), then start afresh."""
        loss, acc = loss_metric.compute(), acc_metric.compute()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        loss_metric.reset()
        acc_metric.reset()
        return acc

    def configure_optimizers(self):
        # fused: one kernel for all of Adam's per-parameter updates (CPU and CUDA), the same arithmetic as
        # the default loop over parameters, and faster.
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
