"""The shard indexes a run reads, read once per job: rank 0 reads them and every other rank receives them
in one broadcast (pretrain.dist.broadcast_from_rank0), instead of thousands of ranks fetching the same
index from an object store at the same second. docs/data.md, "Start-up at scale", has the figures."""
from __future__ import annotations

from pretrain import dist as pdist
from pretrain.config import Config
from pretrain.data.index import ShardIndex, read_index
from pretrain.errors import UserError


def index_urls(cfg: Config, train: bool = True) -> dict[str, tuple[str, object]]:
    """{name: (config key, its URLs)}: train when `train` (empty is read_index's error to give; a mixture's
    sources as source0, source1, ...), then the set ones of val and the k-NN pair."""
    e, d = cfg.eval, cfg.data
    urls = {}
    if train and d.sources:  # a mixture: one index per source, in order ("source0", "source1", ...)
        urls = {f"source{i}": (f"data.sources[{i}].train_urls", src.train_urls) for i, src in enumerate(d.sources)}
    elif train:
        urls = {"train": ("data.train_urls", d.train_urls)}
    for name, key, value in (("val", "data.val_urls", cfg.data.val_urls),
                             ("knn_train", "eval.knn_train_urls", e.knn_every_steps and e.knn_train_urls),
                             ("knn_val", "eval.knn_val_urls", e.knn_every_steps and e.knn_val_urls)):
        if value:
            urls[name] = (key, value)
    return urls


def read_indexes(urls: dict[str, tuple[str, object]]) -> dict[str, ShardIndex]:
    """Each index; an error names its config key. Shards listed by pattern without counts are left for the
    streams to count from their tar headers, as before: on rank 0 alone that walk could outlast the
    collective timeout the other ranks wait under."""
    out = {}
    for name, (key, value) in urls.items():
        try:
            out[name] = read_index(value)
        except UserError as e:
            raise UserError(f"config key {key}: {e}") from None
    return out


def shared_indexes(cfg: Config, train: bool = True) -> dict[str, ShardIndex]:
    """{"train", "val", "knn_train", "knn_val"}: the indexes the config sets (train only when `train`),
    read on rank 0 and received by every rank; a read error ends every rank with rank 0's message. A
    mixture's "train" is the list of its sources' indexes."""
    urls = index_urls(cfg, train)
    got = pdist.broadcast_from_rank0(lambda: read_indexes(urls))
    if train and cfg.data.sources:
        got["train"] = [got.pop(f"source{i}") for i in range(len(cfg.data.sources))]
    return got
