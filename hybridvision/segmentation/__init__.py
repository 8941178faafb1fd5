"""What fine-tuning and distillation share, one home for each piece.

* :mod:`.config` — the ``loss``, ``augment`` and ``eval`` config sections (no torch import, so the
  stages answer ``--help`` at once);
* :mod:`.data` — :func:`~.data.build_data`, the labelled datasets and transforms;
* :mod:`.evaluate` — :func:`~.evaluate.evaluate_segmenter`, exact DDP metrics and an image grid.
"""
