"""Data: WebDataset shard sets (writing, manifests, reading) and the transforms of every stage."""
from crate_mae.data.manifest import Manifest, ShardError, ShardList, read_manifest, resolve_shards
from crate_mae.data.reader import Batch, ShardLoader, ShardStream, eval_loader, train_loader
from crate_mae.data.stream import DataError
from crate_mae.data.transforms import MEAN, STD, EvalTransform, FinetuneTransform, PretrainTransform

__all__ = ["Manifest", "ShardError", "ShardList", "read_manifest", "resolve_shards", "Batch", "DataError",
           "ShardLoader", "ShardStream", "eval_loader", "train_loader", "MEAN", "STD", "EvalTransform",
           "FinetuneTransform", "PretrainTransform"]
