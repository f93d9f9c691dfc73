"""What ``test`` adds to TensorBoard: the confusion matrix, the worst mistakes, per-class accuracy, and what
the network learned: its first-layer filters and, for the first test image, the feature maps of its blocks.

All of it is computed from the logits that ``test_step`` returns and one extra pass over one image, so
training never pays for it.
"""

from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.utils import make_grid

from mnist_lit.distributed import gather_to_rank_zero
from mnist_lit.lessons import block_maps, first_filters
from mnist_lit.model import NUM_CLASSES

if TYPE_CHECKING:  # matplotlib is imported when a report is drawn, not by every command
    from matplotlib.figure import Figure

CONFUSION_MATRIX_TAG = "test/confusion_matrix"
MISTAKES_TAG = "test/mistakes"
CLASS_ACC_TAG = "test/acc_class/{digit}"
FILTERS_TAG = "test/filters"
INPUT_TAG = "test/feature_maps/input"
BLOCK_TAG = "test/feature_maps/block{block}"
# Pixels on screen per filter weight and per feature-map value: TensorBoard shows images at their own size.
FILTER_ZOOM, MAP_ZOOM = 12, 96


class TestReport(Callback):
    """Logs, at the end of ``test``, a confusion-matrix image, a grid of the most confidently misclassified
    test digits (true label, predicted label, its softmax probability), ``test/acc_class/0..9``, the first
    convolution's filters and the first test image's feature maps after each block (none of these two for
    a network without convolutions).

    Args:
        mistakes: how many misclassified digits the grid shows, most confident first.
    """

    __test__ = False  # a Lightning callback, not a pytest test class

    def __init__(self, mistakes: int = 32) -> None:
        self.mistakes = mistakes
        self.confusion = MulticlassConfusionMatrix(NUM_CLASSES)
        self.class_acc = MulticlassAccuracy(NUM_CLASSES, average=None)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.confusion.to(pl_module.device).reset()
        self.class_acc.to(pl_module.device).reset()
        # The worst mistakes so far, kept on the CPU: images (k, 1, 28, 28), labels, predictions, probability.
        self.worst = (torch.empty(0, 1, 28, 28), *(torch.empty(0, dtype=torch.long) for _ in range(2)))
        self.worst_prob = torch.empty(0)
        self.first_image = torch.empty(0, 1, 28, 28)  # the feature maps' image: the first of the first batch

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: torch.Tensor, batch, batch_idx, *_
    ) -> None:
        images, labels = batch
        if batch_idx == 0:
            self.first_image = images[:1]
        logits = outputs.detach()
        self.confusion.update(logits, labels)
        self.class_acc.update(logits, labels)
        probs, predicted = logits.softmax(dim=1).max(dim=1)
        wrong = predicted != labels
        if not wrong.any():
            return
        new = (images[wrong].float().cpu(), labels[wrong].cpu(), predicted[wrong].cpu())
        prob = torch.cat([self.worst_prob, probs[wrong].float().cpu()])
        keep = prob.argsort(descending=True)[: self.mistakes]  # keeps memory at `mistakes` images
        self.worst = tuple(torch.cat([old, more])[keep] for old, more in zip(self.worst, new, strict=True))
        self.worst_prob = prob[keep]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Logged through the module, so they also appear in Lightning's end-of-test table. compute() has
        # already synced the DDP ranks, here on every rank; no sync_dist (see distributed.py).
        for digit, acc in enumerate(self.class_acc.compute().tolist()):
            pl_module.log(CLASS_ACC_TAG.format(digit=digit), acc)
        confusion = self.confusion.compute()  # synced across DDP ranks, so every rank must call it
        # Each DDP rank kept the worst mistakes of its own share: rank 0 gets them all (every rank asks).
        shares = gather_to_rank_zero(trainer, (self.worst, self.worst_prob))
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or shares is None:
            return
        prob = torch.cat([share_prob for _, share_prob in shares])
        keep = prob.argsort(descending=True)[: self.mistakes]
        self.worst = tuple(
            torch.cat(parts)[keep] for parts in zip(*(worst for worst, _ in shares), strict=True)
        )
        self.worst_prob = prob[keep]
        figures = {CONFUSION_MATRIX_TAG: confusion_figure(confusion), MISTAKES_TAG: self.mistakes_figure()}
        pictures = learned_pictures(pl_module.net, self.first_image)
        for logger in loggers:
            for tag, figure in figures.items():
                # Figure objects, not pyplot: nothing global to close, no display backend needed.
                logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
            for tag, picture in pictures.items():
                logger.experiment.add_image(tag, picture, global_step=trainer.global_step)

    def mistakes_figure(self) -> "Figure":
        from matplotlib.figure import Figure

        images, labels, predicted = self.worst
        columns, side, band = 8, 28, 12  # digits per row, digit size, title band above each digit (pixels)
        rows = max(1, -(-len(labels) // columns))
        # The whole grid as one image on one Axes: drawing one Axes per digit took seconds of every test.
        canvas = torch.ones(rows * (side + band), columns * (side + 4))  # white paper
        for i, image in enumerate(images[:, 0]):
            low, high = image.min(), image.max()  # each digit scaled to its own range, as imshow would
            top, left = (i // columns) * (side + band) + band, (i % columns) * (side + 4) + 2
            canvas[top : top + side, left : left + side] = (image - low) / (high - low).clamp(min=1e-6)
        # Drawn about as wide as TensorBoard's image card shows it (~600 px), so its labels stay readable.
        figure = Figure(figsize=(columns * 0.75, rows * 0.95 + 0.4))
        ax = figure.add_axes((0.0, 0.0, 1.0, 1 - 0.4 / (rows * 0.95 + 0.4)))
        ax.axis("off")
        ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for i in range(len(labels)):
            x, y = (i % columns) * (side + 4) + 2 + side / 2, (i // columns) * (side + band) + band - 1
            text = f"{labels[i]}→{predicted[i]} {self.worst_prob[i]:.0%}"
            ax.text(x, y, text, ha="center", va="bottom", fontsize=10)
        title = f"{len(labels)} most confident mistakes: true→predicted, its probability"
        figure.suptitle(title if len(labels) else "no misclassified test digits", fontsize=11)
        return figure


def learned_pictures(net: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the network learned, as (3, H, W) images by tag: the first convolution's kernels (each scaled to
    its own range: white is its largest weight), the normalized ``image`` (1, 1, 28, 28), and each block's
    feature maps for it (one scale per block, so a bright map is a channel that fires strongly)."""
    filters = first_filters(net)
    maps = block_maps(net, image) if filters is not None and len(image) else []
    if not maps:
        return {}
    pictures = {FILTERS_TAG: grid(filters.float(), FILTER_ZOOM, scale_each=True), INPUT_TAG: grid(image, 4)}
    for block, block_map in enumerate(maps, start=1):
        channels = block_map[0].float().unsqueeze(1)  # (C, 1, h, w): one tile per channel
        zoom = MAP_ZOOM // channels.shape[-1]
        pictures[BLOCK_TAG.format(block=block)] = grid(channels / channels.max().clamp(min=1e-6), zoom)
    return pictures


def grid(tiles: torch.Tensor, zoom: int, scale_each: bool = False) -> torch.Tensor:
    """Tiles (N, 1, h, w) as one (3, H, W) image, 8 a row, each pixel ``zoom`` x ``zoom`` on screen."""
    tiles = tiles.detach().cpu().float()
    if scale_each:
        low = tiles.amin(dim=(1, 2, 3), keepdim=True)
        tiles = (tiles - low) / (tiles.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-6)
    elif tiles.max() > 1 or tiles.min() < 0:  # the normalized input image: its own range
        tiles = (tiles - tiles.min()) / (tiles.max() - tiles.min()).clamp(min=1e-6)
    tiles = tiles.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    return make_grid(tiles, nrow=8, padding=max(2, zoom // 2), pad_value=1.0)


def confusion_figure(confusion: torch.Tensor) -> "Figure":
    """A (10, 10) matrix of counts, rows = true digit, columns = predicted digit, as an annotated heat map."""
    from matplotlib.figure import Figure

    confusion = confusion.cpu()
    figure = Figure(figsize=(6, 5.4))  # about TensorBoard's image card: readable there without zooming
    # Fixed margins instead of a layout pass, which took as long as drawing the figure.
    ax = figure.add_axes((0.11, 0.1, 0.86, 0.82))
    # torchmetrics' own plot: the heat map, labelled axes. Counts only where there are any: the few
    # mistakes stand out among blank cells, and drawing 100 numbers was most of the figure's time.
    MulticlassConfusionMatrix(NUM_CLASSES).plot(confusion, ax=ax, cmap="Blues", add_text=False)
    colormap, norm = ax.images[0].cmap, ax.images[0].norm
    for true, predicted in confusion.nonzero().tolist():
        count = int(confusion[true, predicted])
        red, green, blue, _ = colormap(norm(count))
        dark = 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.5  # luminance: white text on dark cells
        color = "white" if dark else "black"
        ax.text(predicted, true, str(count), ha="center", va="center", fontsize=11, color=color)
    ax.tick_params(labelrotation=0, labelsize=11)  # torchmetrics tilts the digits: harder to read
    ax.set_title(f"Confusion matrix, {int(confusion.sum())} test digits")
    return figure
