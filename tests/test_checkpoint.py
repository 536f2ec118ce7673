"""The checkpoint folder's bookkeeping without training: which checkpoints count as complete, what
resume=auto tries and in which order, and what pruning removes."""
import json

import pytest

from pretrain.engine import checkpoint as ckpt
from pretrain.errors import UserError


def _tag(ck, step, world=1, meta=True):
    d = ck / ckpt.tag_of(step)
    d.mkdir(parents=True)
    if meta:
        (d / "meta.json").write_text(json.dumps({"tag": d.name, "uid": f"{d.name}-x", "step": step,
                                                 "world_size": world, "zero_stage": 2}))
    return d


def test_auto_tries_complete_checkpoints_newest_first_up_to_latest(tmp_path):
    for step in (2, 4, 6):
        _tag(tmp_path, step)
    _tag(tmp_path, 5, meta=False)  # no meta.json: never published
    _tag(tmp_path, 8)  # newer than latest: a rolled-back timeline
    (tmp_path / "latest").write_text(ckpt.tag_of(6))
    points, fallback = ckpt.resume_points("auto", str(tmp_path))
    assert fallback and [p.tag for p in points] == [ckpt.tag_of(s) for s in (6, 4, 2)]


def test_auto_with_an_unreadable_latest_looks_at_every_complete_tag(tmp_path, capsys):
    for step in (2, 4):
        _tag(tmp_path, step)
    (tmp_path / "latest").write_text("\x00garbage")
    points, _ = ckpt.resume_points("auto", str(tmp_path))
    assert [p.tag for p in points] == [ckpt.tag_of(4), ckpt.tag_of(2)]
    assert "not a checkpoint tag" in capsys.readouterr().err


def test_an_explicit_path_is_one_point_without_fallback(tmp_path):
    _tag(tmp_path, 2, world=2)
    points, fallback = ckpt.resume_points(str(tmp_path / ckpt.tag_of(2)), str(tmp_path / "elsewhere"))
    assert not fallback and [p.path for p in points] == [f"{tmp_path}/{ckpt.tag_of(2)}"]
    assert points[0].needs_universal(1) and not points[0].needs_universal(2)
    with pytest.raises(UserError, match="checkpoint.resume"):
        ckpt.resume_points(str(tmp_path / "nowhere"), str(tmp_path))


def test_prune_removes_leftovers_of_crashed_saves(tmp_path):
    for step in (1, 2, 3):
        _tag(tmp_path, step)
    (tmp_path / f"{ckpt.tag_of(4)}.tmp-0a1b2c3d").mkdir()
    (tmp_path / f"{ckpt.tag_of(2)}.old-0a1b2c3d").mkdir()
    (tmp_path / f"{ckpt.tag_of(1)}_universal").mkdir()
    (tmp_path / "latest").write_text(ckpt.tag_of(3))
    ckpt.prune(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", ckpt.tag_of(2), ckpt.tag_of(3)]
