"""The training engine: DeepSpeed setup (`ds.py`), schedule, step loop (`trainer.py`), logging
(`metrics.py`, `visuals.py`) and checkpoints (`checkpoint.py`); export and eval live beside them."""
import pretrain._compat  # noqa: F401  before any module here imports timm (importable on a CPU-only torch)
