"""Sequential sample access to one tar shard, with skipping that reads tar headers only.

Hand-written rather than webdataset's `tar_file_expander` because resuming needs "skip the next k
samples without reading their payloads": on a seekable file (local, fsspec) `tarfile` in "r:" mode
seeks past each member's data, so skipping costs one 512-byte header read per file. Non-seekable
streams (`pipe:`) fall back to reading forward. Samples follow the WebDataset convention: members
sharing a key (the name up to the first dot of its basename) form one sample.
"""
from __future__ import annotations

import logging
import re
import tarfile
from typing import Optional

from pretrain.data.index import open_shard

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # the same split as webdataset's base_plus_ext


class ShardCursor:
    """Reads samples of one shard in order; `pos` is the index of the next sample."""

    def __init__(self, url: str):
        self.url = url
        self.pos = 0
        self.broken: Optional[str] = None  # why reading stopped early (truncated or corrupt tar), and where
        self._pending = None  # (key, ext, member): first member of the next sample, data not yet read
        self._file = open_shard(url)
        seekable = bool(getattr(self._file, "seekable", lambda: False)())
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:" if seekable else "r|")
        except (tarfile.TarError, OSError, EOFError) as e:
            self._tar = None
            self._break(f"not a readable tar ({e})", 0)

    def _break(self, why: str, offset: int) -> None:
        """Stop reading this shard: said once, here, with the byte offset; the samples not read are
        counted as bad by the stream (data.max_bad_fraction), so a damaged shard is never silent."""
        self.broken = f"{why} at byte {offset}, sample #{self.pos}"
        log.warning("shard %s is truncated or corrupt: %s; its remaining samples count as bad "
                    "(data.max_bad_fraction)", self.url, self.broken)

    def close(self) -> None:
        try:
            if self._tar is not None:
                self._tar.close()
        finally:
            self._file.close()

    def _next_member(self):
        while self._tar is not None and self.broken is None:
            try:
                m = self._tar.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                self._break(f"truncated or corrupt tar ({e})", self._tar.offset)
                return None
            if m is None:
                return None
            if not m.isfile():
                continue
            match = _KEY_RE.match(m.name)
            if match is None:
                continue  # a file without an extension belongs to no sample
            return match.group(1), match.group(2).lower(), m
        return None

    def _take_sample(self, read: bool) -> Optional[tuple[str, dict[str, bytes]]]:
        first = self._pending or self._next_member()
        self._pending = None
        if first is None:
            return None
        key = first[0]
        members = [first]
        data: dict[str, bytes] = {}
        while True:
            if read:
                _, ext, m = members[-1]
                try:
                    data[ext] = self._tar.extractfile(m).read()
                except (tarfile.TarError, OSError, EOFError) as e:
                    self._break(f"truncated or corrupt tar ({e}) in member {m.name!r}", m.offset_data)
                    data[ext] = None  # type: ignore[assignment]  marks the sample truncated
                    break
            nxt = self._next_member()
            if nxt is None or nxt[0] != key:
                self._pending = nxt
                break
            members.append(nxt)
        self.pos += 1
        return key, data

    def skip(self, n: int) -> int:
        """Skip n samples reading headers only; returns how many were actually there."""
        done = 0
        while done < n and self._take_sample(read=False) is not None:
            done += 1
        return done

    def read(self) -> Optional[tuple[str, dict[str, bytes]]]:
        """The next sample as (key, {ext: bytes}); None at the end (or when the tar broke: see `broken`)."""
        return self._take_sample(read=True)
