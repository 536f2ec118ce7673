"""Regenerate configs/default.yaml and docs/config.md from pretrain/config/schema.py."""
from pathlib import Path

from pretrain.config import render_default_yaml, render_reference_md

root = Path(__file__).resolve().parent.parent
(root / "configs" / "default.yaml").write_text(render_default_yaml())
(root / "docs" / "config.md").write_text(render_reference_md())
print("wrote configs/default.yaml and docs/config.md")
