"""The dataset a loader reads and the samplers that order it (a sweepable registry: random, imbalanced), seeded per
epoch so a resumed epoch draws the same batches. Usage: ds = ImageDataset(items, labels, tf); build_sampler("random",
labels, seed)
"""
import numpy as np
import torch
from torchsampler import ImbalancedDatasetSampler

from datasets.files import load_image
from datasets.transforms import seed_pipeline
from utils.registry import Registry


class ImageDataset(torch.utils.data.Dataset):
    """Yields (image tensor, label or -1, index). A key (index, seed) seeds the augmentation of that
    one sample, so the same seed gives the same batches whatever the number of workers."""

    def __init__(self, items: list, labels: np.ndarray | None, transform):
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_pipeline(self.transform, seed)
        image = self.transform(image=load_image(self.items[index]))["image"]
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, index


class SeededSampler(torch.utils.data.Sampler):
    """The epoch's order from a generator seeded by (seed, epoch), each position paired with an
    augmentation seed drawn from (seed, epoch, position). With `weights`, draws n indices with
    replacement in proportion to them (the imbalanced sampler); else a permutation.
    Under torchrun (world > 1) rank r yields positions r, r + world, ... of that same order, each
    rank n // world of them: with batch_size / world per rank, the ranks' batches together are the
    one-process run's batches of batch_size (with drop_last), augmentation seeds included."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.weights, self.rank, self.world = n, seed, 0, weights, rank, world
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """skip: this rank's first `skip` positions are left out (an epoch resumed after a stop inside it)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.skip)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.weights is None else \
            torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        order = order.tolist()
        for k in range(self.rank + self.skip * self.world, self.n // self.world * self.world, self.world):
            yield order[k], int(np.random.SeedSequence([self.seed, self.epoch, k]).generate_state(1)[0])


SAMPLERS = Registry("sampler")


def build_sampler(name: str, labels: np.ndarray, seed: int, rank: int = 0, world: int = 1) -> SeededSampler:
    sampler = SAMPLERS.build(name, labels, seed)
    sampler.rank, sampler.world = rank, world
    return sampler


@SAMPLERS.register("random")
def random_sampler(labels, seed):
    """Each training image once per epoch, shuffled."""
    return SeededSampler(len(labels), seed)


@SAMPLERS.register("imbalanced")
def imbalanced_sampler(labels, seed):
    """torchsampler's ImbalancedDatasetSampler weights (1 / class count), from the labels array itself so
    it works on any subset or fold; drawn with replacement, every class equally often on average."""
    weights = ImbalancedDatasetSampler(labels, labels=[int(y) for y in labels]).weights
    return SeededSampler(len(labels), seed, weights)

