"""MNIST as uint8 tensors in memory: batches are built by one indexing op and normalized on the device.

The seed notebook used torchvision's per-image ``ToTensor() + Normalize()``; doing that for 60k images
per epoch in Python costs a large part of a CPU epoch (docs/performance.md). Here torchvision only
parses the IDX files (once, in ``setup``), the loader hands out whole uint8 batches, and
``on_after_batch_transfer`` scales and normalizes each batch where it will be used (the GPU, when
there is one).
"""

import os
import shutil
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, default_convert
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchvision.datasets import MNIST
from torchvision.transforms.v2 import functional as TF

from mnist_lit.errors import UserError

# Mean and std of the 60k training pixels scaled to [0, 1] (the seed notebook's cell 4; `mnist_lit stats`).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def idx_files(raw_folder: Path, train: bool) -> tuple[Path, Path]:
    """The images (3-d) and labels (1-d) IDX files of one split, as torchvision names them."""
    prefix = "train" if train else "t10k"
    return raw_folder / f"{prefix}-images-idx3-ubyte", raw_folder / f"{prefix}-labels-idx1-ubyte"


def looks_like_mnist(images: torch.Tensor, labels: torch.Tensor) -> bool:
    """What torchvision does not check of the files it parsed: 28x28 images, one label each, in 0-9."""
    shapes_fit = images.shape[1:] == (28, 28) and len(images) == len(labels) > 0
    return shapes_fit and bool(((labels >= 0) & (labels <= 9)).all())


class DigitTensors(Dataset):
    """Images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64, indexed a whole batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The DataLoader's fetcher calls this with a batch of indices: one gather, no per-image work.
        index = torch.as_tensor(indices)
        if self.images.is_cuda:
            # Indices for images kept on the GPU go there from page-locked memory, asynchronously: a copy
            # from pageable memory would wait for the GPU to finish the previous step.
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        return self.images[index], self.labels[index]

    def to(self, device: torch.device) -> "DigitTensors":
        """These images and labels on ``device`` (itself, if they are there already)."""
        if self.images.device == device:
            return self
        return DigitTensors(self.images.to(device), self.labels.to(device))


class ResumableShuffle(StatefulDistributedSampler):
    """torchdata's StatefulDistributedSampler, with the epoch in its checkpointed state too.

    Epoch e's order is a function of (seed, e) alone and each rank gets a disjoint shard of it. A resumed
    run rebuilds its iterator before Lightning calls ``set_epoch``, so the state must say which epoch's
    order to rebuild and how far into it training had got; an epoch fully handed out resumes as the
    start of the next one.
    """

    def state_dict(self) -> dict:
        if self.yielded >= self.num_samples:
            return {"epoch": self.epoch + 1, "yielded": 0}
        return {"epoch": self.epoch, **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.set_epoch(state["epoch"])


class MNISTDataModule(L.LightningDataModule):
    """MNIST train/val/test/predict loaders.

    Args:
        data_dir: folder holding ``MNIST/raw/`` (torchvision's layout); downloaded there when missing.
        batch_size: images per training batch.
        eval_batch_size: images per batch for validation, test and predict. Evaluation keeps nothing for
            a backward pass, and larger batches cost less per image (fewer steps of fixed host work);
            the results do not depend on it.
        val_size: images held out of the 60k training set for validation.
        split_seed: seed of the train/val split, fixed so that runs with different training seeds
            are validated on the same images.
        num_workers: loader worker processes; 0 is fastest here, since a batch is one indexing op.
        mean: normalization mean of the pixels in [0, 1].
        std: normalization std of the pixels in [0, 1].
        download: fetch MNIST with torchvision when the files are missing.
        predict_path: an image file or a folder of them (PNG/JPEG, any size, colour or grey, either
            polarity) for ``predict`` to read instead of the test set, made MNIST-style (images.py).
        max_pixels: largest image (width x height) that ``predict_path`` may hold, read from each file's
            header before decoding; a larger one is skipped, named.
        on_device: keep the whole dataset, as uint8, on the training device (all of MNIST is 55 MB): on
            a GPU, batches are gathered there and no step copies images from the host.
        max_shift: augment training batches: each image moved by a random whole number of pixels, up to
            this many in each direction, on the device; 0, the seed's choice, trains on the images as
            they are. Validation, test and predict never augment.
        max_rotation: augment training batches: each image rotated by a random angle of up to this many
            degrees either way (bilinear resampling, on the device, before any shift); 0: none.
        max_scale: augment training batches: each image scaled by a random factor within 1 ± this
            (e.g. 0.1: 90% to 110%), with the rotation; 0: none.
    """

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: PositiveInt = 100,
        eval_batch_size: PositiveInt = 1000,
        val_size: PositiveInt = 5000,
        split_seed: int = 42,
        num_workers: NonNegativeInt = 0,
        mean: float = MNIST_MEAN,
        std: PositiveFloat = MNIST_STD,
        download: bool = True,
        predict_path: str | None = None,
        max_pixels: PositiveInt = 50_000_000,  # images.MAX_PIXELS: every phone camera's photo fits
        on_device: bool = False,
        max_shift: NonNegativeInt = 0,
        max_rotation: NonNegativeFloat = 0.0,
        max_scale: ClosedUnitInterval = 0.0,
    ) -> None:
        super().__init__()
        if on_device and num_workers > 0:
            raise UserError(
                "--data.on_device keeps the images on the training device, where loader worker processes "
                f"cannot gather them: set --data.num_workers 0 (it is {num_workers})"
            )
        self.save_hyperparameters()
        self.train_set: DigitTensors | None = None
        self.val_set: DigitTensors | None = None
        self.test_set: DigitTensors | None = None
        self.predict_set: DigitTensors | None = None
        self.predict_files: list[Path] = []  # the files behind predict_set's images, in order
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std per device

    @property
    def raw_folder(self) -> Path:
        return Path(self.hparams.data_dir) / "MNIST" / "raw"

    def prepare_data(self) -> None:
        """Runs on one process per node before ``setup``: download the files that are missing.

        Nothing is kept here for ``setup``, which runs on every process: Lightning's rule for this hook.
        A failed download leaves no folder behind that it made.
        """
        files = [file for train in (True, False) for file in idx_files(self.raw_folder, train)]
        if self._predicting_files() or all(f.is_file() for f in files) or not self.hparams.download:
            return  # the user's images need no MNIST; missing files without download: setup says so
        made = next((p for p in reversed(self.raw_folder.parents) if not p.exists()), None)
        made = made or (None if self.raw_folder.exists() else self.raw_folder)
        try:
            for train in (True, False):
                self._mnist(train, download=True)
        except BaseException:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise

    def setup(self, stage: str) -> None:
        """Runs on every process: parse the IDX files into tensors and split train/val."""
        if stage in ("fit", "validate") and self.train_set is None:
            images, labels = self._tensors(train=True)
            val_size = self.hparams.val_size
            if val_size >= len(labels):
                raise UserError(
                    f"--data.val_size={val_size} leaves no images to train on: "
                    f"{idx_files(self.raw_folder, True)[0]} holds {len(labels)}; choose a val_size below that"
                )
            order = torch.randperm(
                len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed)
            )
            train_idx, val_idx = order[val_size:], order[:val_size]
            self.train_set = DigitTensors(images[train_idx], labels[train_idx])
            self.val_set = DigitTensors(images[val_idx], labels[val_idx])
        if stage == "predict" and self._predicting_files() and self.predict_set is None:
            from mnist_lit.images import load_digits  # only predict on the user's own images needs PIL

            images, self.predict_files = load_digits(Path(self.hparams.predict_path), self.hparams.max_pixels)
            self.predict_set = DigitTensors(images, torch.full((len(images),), -1))  # -1: no label
        elif stage in ("test", "predict") and self.test_set is None:
            self.test_set = DigitTensors(*self._tensors(train=False))

    def train_dataloader(self) -> StatefulDataLoader:
        trainer = self.trainer
        sampler = ResumableShuffle(
            self.train_set,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            # The seed of `seed_everything`, which Lightning exports to every rank (as it does for the
            # DistributedSampler it would otherwise inject).
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        self.train_set = self._placed(self.train_set)
        return self._loader(self.train_set, self.hparams.batch_size, sampler)

    def val_dataloader(self) -> StatefulDataLoader:
        self.val_set = self._placed(self.val_set)
        return self._evaluation_loader(self.val_set)

    def test_dataloader(self) -> StatefulDataLoader:
        self.test_set = self._placed(self.test_set)
        return self._evaluation_loader(self.test_set)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._evaluation_loader(self.predict_set if self._predicting_files() else self.test_set)

    def _placed(self, dataset: DigitTensors | None) -> DigitTensors | None:
        """``dataset`` on the training device with --data.on_device, else where it is (host memory)."""
        trainer = self.trainer
        if not self.hparams.on_device or trainer is None or dataset is None:
            return dataset
        return dataset.to(trainer.strategy.root_device)

    def _evaluation_loader(self, dataset: DigitTensors | None) -> StatefulDataLoader:
        trainer = self.trainer
        batch_size = self.hparams.eval_batch_size
        if trainer is None or trainer.world_size == 1:
            return self._loader(dataset, batch_size)
        # Each image exactly once over all ranks (the default sampler pads shares with repeated images).
        shard = UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
        return self._loader(dataset, batch_size, shard)

    def _predicting_files(self) -> bool:
        # predict_path only means anything to `predict`; fit/test with it set still use MNIST.
        return self.hparams.predict_path is not None and (self.trainer is None or self.trainer.predicting)

    def on_after_batch_transfer(
        self, batch: list[torch.Tensor] | torch.Tensor, dataloader_idx: int
    ) -> list[torch.Tensor] | torch.Tensor:
        if isinstance(batch, torch.Tensor):  # images alone: the model summary's example input
            return self.normalize(batch)
        images, labels = batch
        augmentation = {key: self.hparams[key] for key in ("max_rotation", "max_scale", "max_shift")}
        if any(augmentation.values()) and self.trainer is not None and self.trainer.training:
            from mnist_lit.augment import augmented  # only recipes that augment need it

            # Drawn from the seed and the step alone: a resumed run augments as the uninterrupted one.
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + self.trainer.global_step
            images = augmented(images, seed, **augmentation)
        return [self.normalize(images), labels]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels in [0, 255] (or float32 already in [0, 1]) -> float32 in [0, 1], then standardized."""
        images = TF.to_dtype(images, torch.float32, scale=True)
        mean, std = self._stats_on(images.device)
        return TF.normalize(images, mean=mean, std=std)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision turns a list mean/std into tensors on the images' device at every call: on a GPU,
        # two host-to-device copies that wait for it every step. Tensors already there are used as given.
        if device not in self._stats:
            stats = torch.tensor([[self.hparams.mean], [self.hparams.std]], device=device)
            self._stats[device] = (stats[0], stats[1])
        return self._stats[device]

    def _loader(
        self, dataset: DigitTensors | None, batch_size: int, sampler: DistributedSampler | None = None
    ) -> StatefulDataLoader:
        workers, on_device = self.hparams.num_workers, self.hparams.on_device
        trainer = self.trainer
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            # Batches bound for a GPU in page-locked memory: Lightning's non_blocking copy is then truly
            # asynchronous, instead of a copy from pageable memory that waits for the GPU every step.
            pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda" and not on_device,
            collate_fn=default_convert,  # `__getitems__` already returns a batch
        )

    def training_images(self) -> torch.Tensor:
        """The whole training set (N, 1, 28, 28) uint8, before the train/val split (``mnist_lit stats``)."""
        return self._tensors(train=True)[0]

    def _tensors(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mnist = self._mnist(train, download=False)
        return mnist.data.unsqueeze(1), mnist.targets

    def _mnist(self, train: bool, download: bool) -> MNIST:
        images_file, labels_file = idx_files(self.raw_folder, train)
        try:
            mnist = MNIST(self.hparams.data_dir, train=train, download=download)
        except (RuntimeError, AssertionError, ValueError, TypeError, KeyError, OSError) as err:
            from mnist_lit.data_checks import not_loaded

            raise UserError(not_loaded(self.raw_folder, images_file, labels_file, download, err)) from err
        if not looks_like_mnist(mnist.data, mnist.targets):
            from mnist_lit.data_checks import digits_problem

            raise UserError(digits_problem(images_file, labels_file, mnist.data, mnist.targets))
        return mnist
