"""A Hugging Face hub cache entry made by hand, so hub ids resolve offline in tests."""

from __future__ import annotations

import shutil
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, names: tuple[str, ...]) -> Path:
    """Copy ``names`` of ``folder`` into ``cache`` as the main revision of model ``repo_id``.

    The layout is huggingface_hub's (``models--owner--name/snapshots/<commit>/``, ``refs/main``);
    with ``HF_HUB_CACHE=cache`` and ``HF_HUB_OFFLINE=1`` the id resolves to that snapshot.
    """
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in names:
        shutil.copy(folder / name, snapshot / name)
    return snapshot
