"""Open a shard directory's split as memory-mapped arrays with document boundaries.

This is the trainer's view of the data: no tokenizer, no datatrove, no torch. The dtype always
comes from the manifest (and is cross-checked against every shard's metadata), never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import Shard, open_shard
from .manifest import Manifest, read_manifest


@dataclass
class SplitReader:
    directory: Path
    split: str
    manifest: Manifest
    shards: list[Shard]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype)

    @property
    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def has_loss_mask(self) -> bool:
        return bool(self.shards) and all(s.loss is not None for s in self.shards)

    def documents_iter(self):
        for shard in self.shards:
            for i in range(shard.documents):
                yield shard.document(i)


def open_split(directory: str | Path, split: str = "train") -> SplitReader:
    """Open DIR/<split> as listed in DIR/manifest.json. Raises a clear error naming the file when
    the manifest is missing, the split is absent, a shard's files disagree with each other
    (`open_shard`), or its documents and tokens with the manifest. Together these pin every file's
    byte size, the cheap corruption check; `shards verify` hashes the contents."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if split not in manifest.splits:
        raise KeyError(f"{directory}: split '{split}' not in manifest (has: {', '.join(manifest.splits) or 'none'})")
    dtype = np.dtype(manifest.dtype)
    shards = []
    for stats in manifest.splits[split].shards:
        path = directory / stats.name
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in {directory / 'manifest.json'} but missing")
        shard = open_shard(path, dtype=dtype)
        if shard.documents != stats.documents or int(shard.offsets[-1]) != stats.tokens:
            raise ValueError(
                f"{path}: has {shard.documents} documents / {int(shard.offsets[-1])} tokens, "
                f"manifest says {stats.documents} / {stats.tokens}"
            )
        shards.append(shard)
    return SplitReader(directory, split, manifest, shards)
