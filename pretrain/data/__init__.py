"""Shards in, uint8 batches out: index resolution, shard writing, the resumable train stream, eval stream.

`from pretrain.data import build_train_stream, build_eval_stream, normalize, read_index` (docs/data.md).
The streams take the data.* settings and what else they need (image size, augmentation mode, seed) as
arguments: data knows no model, task or run config. `BatchStream` is the interface the trainer reads.
"""
from pretrain.data.index import ShardIndex, read_index
from pretrain.data.eval_stream import EvalStream, build_eval_stream
from pretrain.data.stream import BatchStream, TrainStream, build_train_stream
from pretrain.data.transforms import normalize

__all__ = ["ShardIndex", "read_index", "BatchStream", "TrainStream", "EvalStream", "build_train_stream",
           "build_eval_stream", "normalize"]
