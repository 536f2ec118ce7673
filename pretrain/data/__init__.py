"""Shards in, uint8 batches out: index resolution, shard writing, the resumable train stream, eval stream."""
from pretrain.data.index import ShardIndex, read_index

__all__ = ["ShardIndex", "read_index"]
