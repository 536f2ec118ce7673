"""Shards in, uint8 batches out: index resolution, shard writing, the resumable train stream, eval stream.

`from pretrain.data import build_train_stream, build_eval_stream, normalize, read_index` (docs/data.md).
"""
from pretrain.data.index import ShardIndex, read_index
from pretrain.data.stream import EvalStream, TrainStream, build_eval_stream, build_train_stream, normalize

__all__ = ["ShardIndex", "read_index", "TrainStream", "EvalStream", "build_train_stream", "build_eval_stream",
           "normalize"]
