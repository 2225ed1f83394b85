"""What a network that needs no key cannot see: the class information in each block's colour.

    python -m benchmarks.per_image_keys_loss [--block 16] [--train-per-class 500] [--test-per-class 100]

Under a fresh key per image (strategy ``per-image-keys``) a network sees each block only up to its
orbit: its polarity (negative-positive), its channel order (colour), its orientation and its place
are gone. ``models/invariant.py`` keeps everything else (its canonical form is a complete invariant
for a generic block). This measures, on the block colour statistics alone, what that costs: a small
classifier (one hidden layer) on the mean of each channel of each block (n blocks x 3 numbers) of
plain CIFAR-10 images,

1. ``in place``: the block means as they are (what a model under one shared key can learn from);
2. ``canonical in place``: each block's means in the invariant model's canonical form (negated when
   the block is darker than mid-grey, channels sorted), blocks still in place: what the per-block
   transforms remove;
3. ``canonical set``: the same, blocks sorted by brightness: what the block permutation removes too
   (all a network that needs no key can know of these statistics).

Same split as ``benchmarks/multikey.py`` (the first images of each class train, the last ones test).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import ROOT
from owners.images import load_rgb

DATA = ROOT.parent / "shared/data/cifar10-jpeg/train"


def block_means(images: np.ndarray, block: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, n, 3) channel means per block in [-1, 1], blocks row-major."""
    n, h, w, _ = images.shape
    grid = images.reshape(n, h // block, block, w // block, block, 3).astype(np.float64) / 127.5 - 1
    return grid.mean(axis=(2, 4)).reshape(n, -1, 3)


def canonical(means: np.ndarray) -> np.ndarray:
    """Each block's means in models/invariant.py's canonical form: polarity, then sorted channels."""
    flipped = np.where(means.mean(axis=2, keepdims=True) < 0, -means, means)
    return np.sort(flipped, axis=2)


def as_set(means: np.ndarray) -> np.ndarray:
    """Blocks in an order that depends on their content only (by brightness): no place left."""
    order = np.argsort(means.mean(axis=2), axis=1, kind="stable")
    return np.take_along_axis(means, order[:, :, None], axis=1)


def accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> float:
    """Test accuracy of a one-hidden-layer classifier on flattened, standardised features."""
    torch.manual_seed(seed)
    x, xt = (torch.tensor(a.reshape(len(a), -1), dtype=torch.float32) for a in (train, test))
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    y = torch.tensor(y_train)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(600):  # full batch: a few seconds on a CPU
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((net(xt).argmax(1).numpy() == y_test).mean())


def load(data: Path, per_class: slice) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((data / name).iterdir())[per_class]:
            images.append(load_rgb(path, 32)[0])
            labels.append(label)
    return np.stack(images), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()
    train, y_train = load(args.data, slice(0, args.train_per_class))
    test, y_test = load(args.data, slice(-args.test_per_class, None))
    means, means_test = block_means(train, args.block), block_means(test, args.block)
    views = {"in place": lambda m: m, "canonical in place": canonical, "canonical set": lambda m: as_set(canonical(m))}
    print(f"block {args.block} ({means.shape[1]} blocks), {len(train)} train / {len(test)} test images; "
          "classifier on per-block channel means")
    print("| features | test accuracy |\n|---|---|")
    for name, view in views.items():
        print(f"| {name} | {accuracy(view(means), y_train, view(means_test), y_test):.1%} |", flush=True)


if __name__ == "__main__":
    main()
