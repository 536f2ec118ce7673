"""Shard lists: resolve `data.train_urls` forms to shard URLs (+ sample counts and class names), open shards.

Forms: a list, a brace pattern (`dir/train-{000000..000009}.tar`), a glob (`dir/*.tar`), several joined
with `::`, or a `<split>.json` index written by `vit-pretrain shards`. Any fsspec URL (local, file://,
s3://, gs://, http(s)://, memory://) or webdataset's `pipe:CMD`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import braceexpand
import fsspec

from pretrain.errors import UserError, first_line

log = logging.getLogger(__name__)

OPEN_TRIES = 4
"""Attempts to open a shard before it is reported as unreachable."""
OPEN_BACKOFF_S = 0.5
"""First retry delay; doubled each attempt (0.5, 1, 2 s)."""
READ_TRIES = 6
"""Attempts of one read at one byte offset (reopening the shard there each time) before the run stops."""
IO_TIMEOUT_ENV = "VIT_PRETRAIN_IO_TIMEOUT"
"""Seconds an http(s) shard request may wait to connect, or between two reads of its answer, before the
attempt fails (default 30). fsspec asks twice per open (HEAD, then GET), so a server that accepts and
never answers ends the job after about OPEN_TRIES x 2 x this + the backoff (4 min at the default)."""


@dataclass
class ShardIndex:
    shards: list[str]
    """Shard URLs, in order."""
    counts: Optional[list[int]] = None
    """Samples per shard (None: shards listed without an index; the streams count them from tar headers)."""
    classes: list[str] = field(default_factory=list)
    """Class names; a label is an index into them ([]: unlabelled)."""
    sizes: Optional[list[int]] = None
    """Bytes per shard, when the index records them (what bounds a shuffle block in bytes)."""


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def remote_error(url: str, e: BaseException) -> Optional[str]:
    """What went wrong reaching an object store, and what to do, in one line; None if `e` is not that."""
    name, text = type(e).__name__, first_line(e) if str(e).strip() else ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return (f"{url!r}: no credentials for the object store; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), or FSSPEC_S3_ANON=true for a public bucket")
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return (f"{url!r}: the bucket does not exist at {endpoint}; check the bucket name and AWS_ENDPOINT_URL "
                "(see docs/data.md, Object stores)")
    if isinstance(e, PermissionError) or any(k in text for k in ("AccessDenied", "InvalidAccessKeyId",
                                                                  "SignatureDoesNotMatch", "Forbidden")):
        return f"{url!r}: access denied ({text}); check the credentials and the bucket's policy"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ConnectionRefusedError", "ConnectTimeout") or "Could not connect to the endpoint" in text:
        return (f"{url!r}: cannot connect to {endpoint} ({name}); check AWS_ENDPOINT_URL (or the fsspec "
                "config's endpoint_url) and the network (see docs/data.md, Object stores)")
    return None


def _load_json_index(url: str) -> ShardIndex:
    try:
        with fsspec.open(url, "r") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"shard index {url!r} is not valid JSON ({e})") from None
    except Exception as e:  # noqa: BLE001  an object store's errors are many types; named ones become one line
        hint = remote_error(url, e)
        if hint:
            raise UserError(hint) from None
        if isinstance(e, FileNotFoundError):
            raise UserError(f"shard index not found: {url!r}; write one with `vit-pretrain shards`") from None
        raise
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise UserError(f"shard index {url!r} has no 'shards' list; expected the format `vit-pretrain shards` writes")
    base = _dirname(url)
    shards = [s if ("://" in s or s.startswith("/") or s.startswith("pipe:")) else f"{base}/{s}"
              for s in meta["shards"]]
    counts = meta.get("counts")
    if counts is not None and len(counts) != len(shards):
        raise UserError(f"shard index {url!r}: {len(counts)} counts for {len(shards)} shards")
    sizes = meta.get("bytes")
    if sizes is not None and len(sizes) != len(shards):
        raise UserError(f"shard index {url!r}: {len(sizes)} byte sizes for {len(shards)} shards")
    return ShardIndex(shards, [int(c) for c in counts] if counts is not None else None,
                      [str(c) for c in meta.get("classes", [])], [int(b) for b in sizes] if sizes is not None else None)


def _is_local(url: str) -> bool:
    """A path on this machine (not a URL of another protocol, not a `pipe:` command)."""
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def _expand_one(pattern: str) -> list[str]:
    if pattern.startswith("pipe:"):
        return list(braceexpand.braceexpand(pattern))
    out: list[str] = []
    for url in braceexpand.braceexpand(pattern):
        if _is_glob(url):
            fs, path = fsspec.core.url_to_fs(url)
            matches = sorted(fs.glob(path))
            local = "file" in (fs.protocol if isinstance(fs.protocol, (list, tuple)) else [fs.protocol])
            out += [m if local else fs.unstrip_protocol(m) for m in matches]
        else:
            out.append(url)
    return out


def _counts_from_sibling_indexes(shards: list[str]) -> tuple[Optional[list[int]], list[str]]:
    """Counts for shards given by pattern: look them up in the `*.json` indexes of their folders."""
    known: dict[str, int] = {}
    classes: list[str] = []
    for base in sorted({_dirname(s) for s in shards if not s.startswith("pipe:")}):
        try:
            fs, path = fsspec.core.url_to_fs(base)
            candidates = [p for p in fs.glob(path.rstrip("/") + "/*.json") if not p.endswith("_info.json")]
        except Exception:  # noqa: BLE001  an unlistable folder simply has no counts
            continue
        for p in candidates:
            try:
                with fs.open(p, "r") as f:
                    meta = json.load(f)
                for name, n in zip(meta.get("shards", []), meta.get("counts", [])):
                    known[f"{base}/{name}" if "/" not in name else name] = int(n)
                classes = classes or [str(c) for c in meta.get("classes", [])]
            except Exception:  # noqa: BLE001  not one of our indexes
                continue
    if all(s in known for s in shards):
        return [known[s] for s in shards], classes
    return None, classes


def read_index(urls: Union[str, list[str]]) -> ShardIndex:
    """Resolve shard URLs in any supported form; counts and classes when an index provides them."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    patterns = [p.strip() for item in patterns for p in item.split("::") if p.strip()]
    if not patterns:
        raise UserError("no shard URLs given (data.train_urls is empty); run `vit-pretrain shards` first")
    if len(patterns) == 1 and patterns[0].endswith(".json"):
        idx = _load_json_index(patterns[0])
        if not idx.shards:
            raise UserError(f"shard index {patterns[0]!r} lists no shards")
        return idx
    shards: list[str] = []
    for p in patterns:
        if p.endswith(".json"):
            shards += _load_json_index(p).shards
            continue
        got = _expand_one(p)
        if not got:
            raise UserError(f"shard pattern matched no files: {p!r}")
        # local files are checked now (cheap); remote ones when opened, with retries
        missing = [u for u in got if _is_local(u) and not os.path.exists(u.removeprefix("file://"))]
        if len(missing) == len(got):
            raise UserError(f"shard pattern matched no files: {p!r}")
        if missing:
            raise UserError(f"{len(missing)} of {len(got)} shards of {p!r} do not exist, e.g. {missing[0]!r}")
        shards += got
    counts, classes = _counts_from_sibling_indexes(shards)
    return ShardIndex(shards, counts, classes)


def _open_options(url: str) -> dict:
    """fsspec options for a shard URL: http(s) requests get connect and read timeouts (aiohttp's own
    default is 5 minutes in total per request, and none per read)."""
    if not url.startswith(("http://", "https://")):
        return {}
    try:
        import aiohttp
    except ImportError:
        raise UserError(f"shard {url!r}: http(s) shards need aiohttp: pip install 'vit-pretrain[http]'") from None
    timeout = float(os.environ.get(IO_TIMEOUT_ENV) or 30)
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                               sock_read=timeout)}}


def _reason(e: BaseException) -> str:
    """`Type: message` of an error and of the cause it wraps (fsspec's http reports a timeout as
    FileNotFoundError(url) from the timeout)."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if cause is not None and cause is not e:
        text += f", from {type(cause).__name__}: {cause or 'no answer'}"
        if isinstance(cause, TimeoutError):
            text += f" (${IO_TIMEOUT_ENV}={os.environ.get(IO_TIMEOUT_ENV) or 30}s)"
    return text


def _open_raw(url: str):
    """A binary file object for a shard; retried with backoff, then a UserError naming the URL."""
    delay = OPEN_BACKOFF_S
    for attempt in range(1, OPEN_TRIES + 1):
        try:
            if url.startswith("pipe:"):
                from webdataset.gopen import gopen  # webdataset owns the pipe: protocol (shell commands)

                return gopen(url, "rb")
            return fsspec.open(url, "rb", **_open_options(url)).open()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  any transport error is retried, then reported by name
            hint = remote_error(url, e)
            if attempt == OPEN_TRIES or (hint and "cannot connect" not in hint):  # a wrong name stays wrong
                raise UserError(f"shard unreachable after {attempt} tries: " + (hint or (
                    f"{url!r} ({_reason(e)}); check the URL, the server and credentials"))) from None
            log.warning("opening shard %s failed (%s); retry %d in %.1fs", url, _reason(e), attempt, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def open_shard(url: str) -> "ResumingReader":
    """A shard's bytes; a read that fails is retried from the byte offset reached (see ResumingReader)."""
    return ResumingReader(url)


class ResumingReader:
    """A shard file that survives dropped connections: a failed read reopens the URL at the offset the
    reader had reached and reads again, with backoff, up to READ_TRIES times in a row; every successful
    read resets the count. Nothing is restarted or skipped, so the bytes seen are the stored bytes.

    The unit of re-reading is one read of the underlying file: s3fs/gcsfs fetch `default_block_size`
    (5 MiB) per request and keep none of a block cut short, so at most one block is fetched again. A
    non-seekable stream (`pipe:`) is reopened and read forward to the offset.
    """

    def __init__(self, url: str):
        self.url = url
        self._f = _open_raw(url)
        self._seekable = bool(getattr(self._f, "seekable", lambda: False)())
        self._pos = 0

    def seekable(self) -> bool:
        return self._seekable

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._f.seek(offset, whence)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        delay = OPEN_BACKOFF_S
        for attempt in range(1, READ_TRIES + 1):
            try:
                data = self._f.read(n)
                self._pos += len(data)
                return data
            except Exception as e:  # noqa: BLE001  transports raise many types (aiohttp, botocore, OSError)
                if attempt == READ_TRIES:
                    raise UserError(f"reading shard {self.url!r} at byte {self._pos} failed {READ_TRIES} times "
                                    f"({type(e).__name__}: {str(e)[:200]}); check the network and the endpoint"
                                    ) from None
                log.warning("reading shard %s at byte %d failed (%s: %.200s); reopening there, retry %d in %.1fs",
                            self.url, self._pos, type(e).__name__, e, attempt, delay)
                time.sleep(delay)
                delay *= 2
                self._reopen()
        raise AssertionError("unreachable")

    def _reopen(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001  the old connection is already broken
            pass
        self._f = _open_raw(self.url)
        if self._seekable:
            self._f.seek(self._pos)
            return
        left = self._pos
        while left > 0:  # a stream: read forward to where we were
            got = self._f.read(min(left, 1 << 20))
            if not got:
                raise UserError(f"shard {self.url!r} is shorter on reopening ({self._pos - left} bytes) than "
                                f"the {self._pos} bytes read before; it changed while being read")
            left -= len(got)

    def close(self) -> None:
        self._f.close()
