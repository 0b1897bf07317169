"""Several labelled sources as one dataset: each item says which source it is from and which
classes that source labels, so a method can train on all of them with per-source losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class MultiSourceDataset(Dataset):
    """The sources one after another (index `offsets[s] + i` is item i of source s); every item
    gains `source` (its source's index) and `classes` (bool (num_classes,), the trainIds its
    source labels). engine/sampling.py's MultiSourceBatchSampler draws batches from it."""

    def __init__(
        self, sources: Sequence[Dataset], classes: Sequence[Sequence[int]], num_classes: int
    ) -> None:
        if len(sources) != len(classes):
            raise ValueError(f"{len(sources)} sources but {len(classes)} class sets")
        self.sources = list(sources)
        self.sizes = [len(d) for d in self.sources]
        self.offsets = [sum(self.sizes[:s]) for s in range(len(self.sources))]
        self.masks = []
        for ids in classes:
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[list(ids)] = True
            self.masks.append(mask)

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, index: int) -> tuple[int, int]:
        """(source, index within that source) of a global index."""
        for s in reversed(range(len(self.sources))):
            if index >= self.offsets[s]:
                return s, index - self.offsets[s]
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict[str, object]:
        s, i = self.locate(index)
        item = dict(self.sources[s][i])
        item["source"] = s
        item["classes"] = self.masks[s]
        return item
