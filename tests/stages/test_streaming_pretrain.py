"""pretrain/run.py reads a local Hugging Face `datasets` folder, map-style and streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ._util import run_stage, tiny_pretrain_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(12)]
    ds = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    out = tmp_path_factory.mktemp("hf") / "unlabeled"
    ds.save_to_disk(str(out), num_shards=4)
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_pretrain_on_local_hf_dataset(tmp_path: Path, hf_dir: Path, streaming: bool):
    res = run_stage(
        "pretrain/run.py",
        *tiny_pretrain_args(tmp_path),
        f"data.source={hf_dir}",
        f"data.streaming={str(streaming).lower()}",
        "probe.source=none",
        "train.max_steps=3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
