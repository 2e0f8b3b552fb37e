"""Check that the rock-field domains have a real, but learnable, domain shift.

Trains a tiny fully-convolutional U-Net-like net (~85k parameters, pure torch, CPU) on "source" scenes, evaluates it
on the source test split and on every target domain (no adaptation), then fine-tunes a copy of it on a few target
training scenes and evaluates again. The shift is useful for adaptation experiments when

* the source model is good on source (mIoU >= ~0.75),
* it clearly degrades on every target without adaptation (>= ~15 mIoU points),
* a little target data recovers most of the gap.

Also renders a grid of examples (image + colourised label, two rows per domain) to ``docs/rock_domains.png``.

Usage::

    python benchmarks/check_domain_shift.py              # full check + figure (~2-3 min on 2 idle CPU cores)
    python benchmarks/check_domain_shift.py --threads 1  # on a busy machine: 2 threads contend badly with others
    python benchmarks/check_domain_shift.py --plot-only

Reference run (96 px, 400 source / 100 target train images, 100 test images per domain, seed 0; CPU kernels make
the numbers move by about 0.02 with the thread count)::

    domain         source-only   adapted
    source               0.962
    moon-real            0.339     0.843
    mars                 0.117     0.822
    moon-highsun         0.338     0.869

Mars is the far target: its colours invert the source cue "rocks are brighter than the ground", so a source-only
model labels most of the Martian ground as rock; the lunar targets keep part of the source's cues.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from peft_vision_ext.data import (
    ROCK_DOMAINS,
    ROCK_LABELS,
    SegmentationTransform,
    collate_segmentation,
    load_rock_dataset,
    render_rock_scene,
)


NUM_CLASSES = len(ROCK_LABELS)
# Colours of the label maps in the figure: ground brown, rock red, sky blue.
PALETTE = np.array([[120, 90, 60], [230, 60, 40], [80, 140, 230]], dtype=np.uint8)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """Three-scale encoder/decoder with additive skip connections (~90k parameters).

    Most computation happens at 1/2 and 1/4 resolution and the skips are added (not concatenated), so a training step
    stays cheap on a 2-core CPU while full-resolution features keep pebble-sized rocks resolvable.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn_relu(3, w)
        self.down1 = nn.Sequential(conv_bn_relu(w, 2 * w, stride=2), conv_bn_relu(2 * w, 2 * w))
        self.down2 = nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2), conv_bn_relu(4 * w, 4 * w))
        self.lat2 = nn.Conv2d(4 * w, 2 * w, 1)
        self.up1 = conv_bn_relu(2 * w, 2 * w)
        self.lat1 = nn.Conv2d(2 * w, w, 1)
        self.up0 = conv_bn_relu(w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.stem(x)
        e1 = self.down1(e0)
        e2 = self.down2(e1)
        d1 = self.up1(F.interpolate(self.lat2(e2), size=e1.shape[-2:], mode="bilinear") + e1)
        d0 = self.up0(F.interpolate(self.lat1(d1), size=e0.shape[-2:], mode="bilinear") + e0)
        return self.head(d0)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(conf: torch.Tensor) -> tuple[float, list[float]]:
    """Mean IoU over the classes that occur (in target or prediction), and the per-class IoUs (nan if absent)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    return float(iou[union > 0].mean()), [float(v) for v in iou]


def load_tensors(domain: str, split: str, n: int, size: int) -> dict[str, torch.Tensor]:
    ds = load_rock_dataset(domain, split, num_samples=n, image_size=size, seed=0)
    ds = ds.with_transform(SegmentationTransform())
    return collate_segmentation([ds[i] for i in range(len(ds))])


def train(model: nn.Module, data: dict[str, torch.Tensor], epochs: int, lr: float, batch_size: int = 16) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data["labels"]) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data["labels"]), generator=gen)
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            x, y = data["pixel_values"][idx], data["labels"][idx]
            if torch.rand((), generator=gen) < 0.5:  # flip augmentation, same for image and label
                x, y = x.flip(-1), y.flip(-1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for start in range(0, len(data["labels"]), 50):
        x, y = data["pixel_values"][start : start + 50], data["labels"][start : start + 50]
        conf += confusion_matrix(model(x).argmax(1), y)
    return miou(conf)


def plot_examples(path: Path, size: int = 128, columns: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 * len(ROCK_DOMAINS)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 1.9))
    for d, domain in enumerate(ROCK_DOMAINS):
        for j in range(columns):
            image, label = render_rock_scene(domain, np.random.default_rng(1000 + j), size)
            axes[2 * d, j].imshow(image)
            axes[2 * d + 1, j].imshow(PALETTE[label])
        axes[2 * d, 0].set_title(domain, fontsize=9, loc="left")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("rock-field domains (label: ground brown, rock red, sky blue)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"saved {path}")


def time_generation(sizes: tuple[int, ...] = (128, 256), repeats: int = 50) -> None:
    for size in sizes:
        cells = []
        for domain in ROCK_DOMAINS:
            rng = np.random.default_rng(0)
            render_rock_scene(domain, rng, size)  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                render_rock_scene(domain, rng, size)
            cells.append(f"{domain} {1000 * (time.perf_counter() - t0) / repeats:.2f} ms")
        print(f"generation @ {size}px: " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--source-train", type=int, default=400)
    parser.add_argument("--target-train", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--figure", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "rock_domains.png"
    )
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    plot_examples(args.figure)
    time_generation()
    if args.plot_only:
        return

    torch.manual_seed(0)
    t0 = time.perf_counter()
    source_train = load_tensors("source", "train", args.source_train, args.size)
    tests = {d: load_tensors(d, "test", args.test, args.size) for d in ROCK_DOMAINS}
    print(f"data: {time.perf_counter() - t0:.1f}s")

    model = TinyUNet()
    print(f"TinyUNet parameters: {sum(p.numel() for p in model.parameters()):,}")
    t0 = time.perf_counter()
    train(model, source_train, epochs=args.epochs, lr=5e-3)
    print(f"source training: {time.perf_counter() - t0:.1f}s")

    names = ", ".join(ROCK_LABELS.values())
    print(f"\n{'domain':<14}{'source-only':>12}{'adapted':>10}{'drop':>8}{'recovered':>11}   per-class IoU ({names})")
    src_miou, src_cls = evaluate(model, tests["source"])
    print(f"{'source':<14}{src_miou:>12.3f}{'':>10}{'':>8}{'':>11}   {np.round(src_cls, 3).tolist()}")
    for domain in ROCK_DOMAINS[1:]:
        before, before_cls = evaluate(model, tests[domain])
        t0 = time.perf_counter()
        adapted = copy.deepcopy(model)
        train(adapted, load_tensors(domain, "train", args.target_train, args.size), args.finetune_epochs, lr=4e-3)
        after, after_cls = evaluate(adapted, tests[domain])
        drop = src_miou - before
        recovered = (after - before) / max(drop, 1e-6)
        print(
            f"{domain:<14}{before:>12.3f}{after:>10.3f}{100 * drop:>7.1f}p{100 * recovered:>10.0f}%"
            f"   {np.round(before_cls, 3).tolist()} -> {np.round(after_cls, 3).tolist()}"
            f"  ({time.perf_counter() - t0:.0f}s)"
        )


if __name__ == "__main__":
    main()
