"""`vit-pretrain bench loader --quick` through the real CLI: every pipeline runs and the JSON is complete."""
import json
import os

import pytest


@pytest.mark.slow
def test_bench_loader_quick(cli, tmp_path):
    """On the main install: scikit-image (a dev extra) is made unimportable, as it is there."""
    blocker = tmp_path / "no_skimage" / "skimage"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'skimage'\", name='skimage')\n")
    path = os.pathsep.join(p for p in (str(blocker.parent), os.environ.get("PYTHONPATH", "")) if p)
    out = tmp_path / "bench.json"
    r = cli("bench", "loader", "--quick", "--json", str(out), "--loader-size", "64", "--loader-batch", "16",
            "--loader-dir", str(tmp_path / "work"), cwd=tmp_path, env={"PYTHONPATH": path})
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(out.read_text())
    assert res["name"] == "loader" and res["unit"] == "images/s" and res["goal"] == 1.5
    assert res["ours"] > 0 and res["baseline"] > 0 and res["decode_only_1core"] > 0
    assert abs(res["ratio"] - res["ours"] / res["baseline"]) < 1e-9 and res["met"] == (res["ratio"] >= 1.5)
    assert len(list((tmp_path / "work" / "photos").rglob("*.jpg"))) == 256
    assert sorted(res["peers"]) == ["timm_wds", "webdataset"] and res["best_peer"] in res["peers"]
    assert abs(res["ratio_to_best_peer"] - res["ours"] / max(res["peers"].values())) < 1e-9
    # every pipeline reads the 256 images once per pass, less at most a partial batch per worker
    assert all(256 - 2 * 16 <= n <= 256 for n in res["images_per_pass"].values()), res["images_per_pass"]
    pipelines = {"ours", "baseline", "webdataset", "timm_wds"}
    assert set(res["first_batch_s"]) == pipelines and all(0 < t < 60 for t in res["first_batch_s"].values())
    assert set(res["worker_rss_mib"]) == pipelines and all(v > 10 for v in res["worker_rss_mib"].values())
