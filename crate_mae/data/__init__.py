"""Data: WebDataset shard sets (writing, manifests, reading), the transforms of every stage, and the one way a
batch reaches the device (`to_device`, run by `DeviceLoader`)."""
from crate_mae.data.device_decode import to_device
from crate_mae.data.manifest import Manifest, ShardError, ShardList, read_manifest, resolve_shards
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.data.reader import Batch, ShardLoader, ShardStream, eval_loader, train_loader
from crate_mae.data.transforms import MEAN, STD, EvalTransform, FinetuneTransform, PretrainTransform
from crate_mae.errors import DataError

__all__ = ["Manifest", "ShardError", "ShardList", "read_manifest", "resolve_shards", "Batch", "DataError",
           "DeviceLoader", "ShardLoader", "ShardStream", "eval_loader", "to_device", "train_loader", "MEAN", "STD",
           "EvalTransform", "FinetuneTransform", "PretrainTransform"]
