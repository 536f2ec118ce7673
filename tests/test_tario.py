"""The shard cursor's fast header path reads exactly what tarfile reads: the same samples, the same skips, and
the same stop (message and byte) on truncated or corrupt tars, over many kinds of tar and random damage."""
import io
import random
import tarfile

import pytest
from webdataset import TarWriter

from pretrain.data.tario import ShardCursor


def _plain(c: ShardCursor) -> ShardCursor:
    return c


def _tarfile_only(c: ShardCursor) -> ShardCursor:
    c._hand_over()  # tarfile reads the whole shard from byte 0: the reader before the fast path
    return c


def _trace(path: str, ops: list[int], make) -> list:
    """What a cursor gives for `ops` (0: read one sample, k > 0: skip k), then its position and stop reason."""
    c = make(ShardCursor(path))
    out = []
    try:
        for k in ops:
            out.append(c.read() if k == 0 else c.skip(k))
        out.append(("end", c.pos, c.broken))
    finally:
        c.close()
    return out


def _webdataset(n: int, mtime=0.0) -> bytes:
    buf = io.BytesIO()
    w = TarWriter(buf, encoder=False, mtime=mtime)
    for i in range(n):
        w.write({"__key__": f"s{i:05d}", "png": bytes((i + j) % 256 for j in range(40 + 37 * i)), "cls": str(i).encode()})
    w.close()
    return buf.getvalue()


def _add(t: tarfile.TarFile, name: str, data: bytes, **info) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in info.items():
        setattr(ti, k, v)
    t.addfile(ti, io.BytesIO(data))


def _mixed(fmt: int, pax_global: bool = False) -> bytes:
    """Plain members first (an empty one, a large one, non-ASCII names, a file without an extension, a name
    over 100 characters: a ustar prefix, a pax path or a GNU long name), then a directory and a link (tarfile
    reads on from there), then one more sample."""
    buf = io.BytesIO()
    kw = {"pax_headers": {"comment": "global"}} if pax_global else {}
    long = "x" * 90 + "/" + "y" * 60
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as t:
        _add(t, "dir/a.jpg", b"A" * 700, mtime=1700000000)
        _add(t, "dir/a.cls", b"1")
        _add(t, "README", b"no extension")
        _add(t, "dir/ü-ñ.jpg", b"unicode")
        _add(t, "dir/ü-ñ.cls", b"3")
        _add(t, "e.jpg", b"")
        _add(t, "e.cls", b"4")
        _add(t, "big.jpg", bytes(range(256)) * 40, mtime=1.5)  # a float mtime: a pax header in pax format
        _add(t, "big.cls", b"5")
        _add(t, long + ".jpg", b"long" * 50)
        _add(t, long + ".cls", b"2")
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        link = tarfile.TarInfo("dir/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "dir/a.jpg"
        t.addfile(link)
        _add(t, "z.jpg", b"last")
        _add(t, "z.cls", b"6")
    return buf.getvalue()


TARS = {"webdataset": lambda: _webdataset(12), "webdataset-int-mtime": lambda: _webdataset(12, mtime=0),
        "gnu": lambda: _mixed(tarfile.GNU_FORMAT), "ustar": lambda: _mixed(tarfile.USTAR_FORMAT),
        "pax": lambda: _mixed(tarfile.PAX_FORMAT), "pax-global": lambda: _mixed(tarfile.PAX_FORMAT, True)}
OPS = [[0] * 20, [1, 0, 2, 0, 0, 3, 0, 0], [5, 0, 30], [0, 4, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("kind", sorted(TARS))
def test_fast_path_reads_what_tarfile_reads(tmp_path, kind):
    path = tmp_path / "s.tar"
    path.write_bytes(TARS[kind]())
    for ops in OPS:
        assert _trace(str(path), ops, _plain) == _trace(str(path), ops, _tarfile_only)
    samples = [r for r in _trace(str(path), OPS[0], _plain)[:-1] if r is not None]
    assert len(samples) >= 6 and all(data for _, data in samples)  # it read the samples, with their files
    # the fast path reads up to the first header it leaves to tarfile: none in ours (webdataset's), the global
    # header at byte 0 in pax-global, the directory (or GNU's long name) after the fourth sample in the others
    # (a read looks at the next member's header: a sample ends where another key begins)
    c = ShardCursor(str(path))
    for _ in range(3):
        c.read()
    assert (c._tar is None) == (kind != "pax-global")
    while c.read() is not None:
        pass
    assert (c._tar is None) == kind.startswith("webdataset")
    c.close()


def test_damaged_tars_stop_where_and_as_tarfile_stops(tmp_path):
    """Truncated at many lengths and with bytes overwritten at random places: the same samples, then the same
    `broken` message and byte (or the same quiet end) as tarfile."""
    rng = random.Random(0)
    cases = 0
    for kind in sorted(TARS):
        good = TARS[kind]()
        cuts = sorted({rng.randrange(len(good)) for _ in range(25)} | {0, 1, 511, 512, 513, 1024, 1536, len(good) - 1})
        damaged = [good[:n] for n in cuts]
        for _ in range(25):
            b = bytearray(good)
            at = rng.randrange(len(b))
            for i in range(at, min(len(b), at + rng.choice([1, 4, 64]))):
                b[i] = rng.randrange(256)
            damaged.append(bytes(b))
        for i, data in enumerate(damaged):
            path = tmp_path / f"{kind}-{i}.tar"
            path.write_bytes(data)
            ops = OPS[i % len(OPS)]
            assert _trace(str(path), ops, _plain) == _trace(str(path), ops, _tarfile_only), (kind, i)
            cases += 1
    assert cases > 300


def test_truncated_member_is_reported_with_its_byte(tmp_path):
    good = _webdataset(4)
    path = tmp_path / "cut.tar"
    # a member is a pax header, its record block and the ustar header (3 x 512 bytes), then its data:
    # sample 0 (.cls, .png of 40 bytes) takes 4,096 bytes, sample 1's .cls 2,048: cut 30 bytes into its .png data
    path.write_bytes(good[:4096 + 2048 + 1536 + 30])
    c = ShardCursor(str(path))
    assert c.read()[0] == "s00000"
    key, data = c.read()
    assert key == "s00001" and data == {"cls": b"1", "png": None}  # cut short: marked missing (counted bad)
    assert c.broken == ("truncated or corrupt tar (unexpected end of data) in member 's00001.png' at byte 7680, "
                        "sample #1")
    assert c.read() is None and c._tar is None  # the fast path read it all
    c.close()
