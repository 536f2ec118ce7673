"""Sequential sample access to one tar shard, with skipping that reads tar headers only.

Hand-written rather than webdataset's `tar_file_expander` because resuming needs "skip the next k
samples without reading their payloads": on a seekable file (local, fsspec) a member's data is seeked
past, so skipping costs one 512-byte header read per file. Non-seekable streams (`pipe:`) are read
forward by `tarfile`. Samples follow the WebDataset convention: members sharing a key (the name up to
the first dot of its basename) form one sample.

On a seekable file the plain headers writers make (a regular file, ustar or GNU, octal size, valid
checksum, alone or after a pax header of names, sizes and times only) are parsed here, as `tarfile` parses
them: its `TarFile.next` costs ~30 us a member in Python (every field, a TarInfo, a list of all members),
~45% of a data worker's time on small images (digits, pre-resized shards). The first header that is
anything else (GNU long names, other pax records, links, directories, base-256 sizes, a bad checksum, a
short block) is handed to `tarfile`, opened at that byte, which reads the rest of the shard: what it
accepts, raises or ends on is unchanged (tests/test_tario.py compares both on damaged tars).
"""
from __future__ import annotations

import logging
import re
import tarfile
from typing import NamedTuple, Optional

from pretrain.data.index import open_shard

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # the same split as webdataset's base_plus_ext
_BLOCK = tarfile.BLOCKSIZE
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE)  # the regular-file type flags the fast path reads
_ZEROS = bytes(_BLOCK)
_END = "end"  # the fast path met the end-of-archive block
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's pattern for a pax record
# pax keywords that name, size or only describe a file (webdataset's TarWriter writes `mtime` for every member);
# any other (hdrcharset, GNU.sparse.*, linkpath, ...) is left to tarfile
_PAX_KEYS = {b"path", b"size", b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"}


class _Member(NamedTuple):
    """A regular file's header, as the fast path read it (tarfile.TarInfo's fields that are used here)."""
    name: str
    offset_data: int
    size: int


def _blocks(size: int) -> int:
    """Bytes of `size` bytes of data padded to whole blocks."""
    return -(-size // _BLOCK) * _BLOCK


def _header(buf: bytes) -> Optional[tuple[bytes, str, int]]:
    """(type flag, name, size) of a 512-byte header with an octal size and a valid unsigned checksum, the name
    decoded and joined to its ustar prefix as tarfile.TarInfo.frombuf does; None for anything else."""
    if len(buf) != _BLOCK or buf[124] & 0x80:  # short, or a base-256 size
        return None
    try:
        if int(buf[148:156].split(b"\0", 1)[0].strip(), 8) != sum(buf) - sum(buf[148:156]) + 256:
            return None  # a bad or signed checksum
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    name = tarfile.nts(buf[0:100], tarfile.ENCODING, "surrogateescape")
    prefix = tarfile.nts(buf[345:500], tarfile.ENCODING, "surrogateescape")
    return buf[156:157], prefix + "/" + name if prefix else name, size


def _pax(data: bytes) -> Optional[dict[bytes, bytes]]:
    """A pax extended header's records, parsed as tarfile does, when every keyword is in _PAX_KEYS; else None."""
    records, pos = {}, 0
    while (m := _PAX_RECORD.match(data, pos)) is not None:
        length, key = int(m.group(1)), m.group(2)
        if length == 0 or key not in _PAX_KEYS:
            return None
        records[key] = data[m.end(2) + 1:m.start(1) + length - 1]
        pos += length
    return records


class ShardCursor:
    """Reads samples of one shard in order; `pos` is the index of the next sample."""

    def __init__(self, url: str):
        self.url = url
        self.pos = 0
        self.broken: Optional[str] = None  # why reading stopped early (truncated or corrupt tar), and where
        self._pending = None  # (key, ext, member): first member of the next sample, data not yet read
        self._file = open_shard(url)
        self._tar = None  # tarfile, once it reads (a stream from the start, a file from its first unusual header)
        self._offset: Optional[int] = 0  # the next header's byte while the fast path reads; None after
        if not bool(getattr(self._file, "seekable", lambda: False)()):
            self._hand_over("r|")

    def _hand_over(self, mode: str = "r:") -> None:
        """tarfile reads on from the current position (the start, or the header the fast path declined)."""
        at, self._offset = self._offset, None
        try:
            self._tar = tarfile.open(fileobj=self._file, mode=mode)
        except (tarfile.TarError, OSError, EOFError) as e:
            self._tar = None
            if at:  # past byte 0 tarfile raises here only for a bad header after a pax header: a read error
                self._break(f"truncated or corrupt tar ({e})", at)
            else:
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

    def _plain_next(self):
        """The next member by the fast path (a plain regular file, after an extended header of _PAX_KEYS or
        none), _END at the end-of-archive block; None where tarfile decides: the file is then positioned at
        that header."""
        at = self._offset
        if at:  # as tarfile does: the previous member's data must end inside the file
            self._file.seek(at - 1)
            buf = self._file.read(_BLOCK + 1)
            if not buf:
                raise tarfile.ReadError("unexpected end of data")
            buf = buf[1:]
        else:
            buf = self._file.read(_BLOCK)
        if buf == _ZEROS:
            return _END  # the end-of-archive block (tarfile ends there too)
        head = _header(buf)
        data_at, pax = at + _BLOCK, {}
        if head is not None and head[0] == tarfile.XHDTYPE:
            raw = self._file.read(_blocks(head[2]))
            pax = _pax(raw) if len(raw) == _blocks(head[2]) else None
            head = _header(self._file.read(_BLOCK)) if pax is not None else None
            data_at += len(raw) + _BLOCK  # the records' blocks, then the file's own header
        if head is None or head[0] not in _PLAIN or not head[1] or head[1].endswith("/"):
            self._file.seek(at)  # a directory, link, global header, long name, ...: tarfile's
            return None
        name, size = head[1], head[2]
        try:
            if b"path" in pax:
                name = pax[b"path"].decode("utf-8").rstrip("/")
            if b"size" in pax:
                size = int(pax[b"size"])
        except ValueError:  # tarfile's fallbacks: an undecodable path, an unreadable size
            self._file.seek(at)
            return None
        self._offset = data_at + _blocks(size)
        return _Member(name, data_at, size)

    def _next_member(self):
        while self._offset is not None and self.broken is None:
            try:
                m = self._plain_next()
            except (tarfile.TarError, OSError, EOFError) as e:
                self._break(f"truncated or corrupt tar ({e})", self._offset)
                return None
            if m is _END:
                self._offset = None
                return None
            if m is None:
                self._hand_over()
                break
            match = _KEY_RE.match(m.name)
            if match is not None:  # a file without an extension belongs to no sample
                return match.group(1), match.group(2).lower(), m
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
                    data[ext] = self._read_data(m)
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

    def _read_data(self, m) -> bytes:
        if not isinstance(m, _Member):
            return self._tar.extractfile(m).read()
        self._file.seek(m.offset_data)
        data = self._file.read(m.size)
        if len(data) != m.size:
            raise tarfile.ReadError("unexpected end of data")  # tarfile's own words for a short member
        return data

    def skip(self, n: int) -> int:
        """Skip n samples reading headers only; returns how many were actually there."""
        done = 0
        while done < n and self._take_sample(read=False) is not None:
            done += 1
        return done

    def read(self) -> Optional[tuple[str, dict[str, bytes]]]:
        """The next sample as (key, {ext: bytes}); None at the end (or when the tar broke: see `broken`)."""
        return self._take_sample(read=True)
