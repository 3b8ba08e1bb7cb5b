"""ShardLoom's floor: the on-disk token shard format, manifests, readers, tokenizers and storage.

Imports neither `pipelines` nor `trainer`.
"""
from .format import ShardWriter, dtype_for_vocab, open_shard, read_metadata
from .manifest import Manifest, TokenizerInfo, build_manifest, read_manifest, write_manifest
from .reader import SplitReader, open_split

__all__ = [
    "ShardWriter", "dtype_for_vocab", "open_shard", "read_metadata",
    "Manifest", "TokenizerInfo", "build_manifest", "read_manifest", "write_manifest",
    "SplitReader", "open_split",
]
