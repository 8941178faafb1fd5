"""Deployment without PyTorch (numpy, Pillow, onnxruntime), split by job.

* :mod:`~hybridvision.deploy.reader`: the project's one image / mask reader (``data.io`` wraps it);
* :mod:`~hybridvision.deploy.runtime`: the onnxruntime session and predictor (normalisation,
  whole-image and sliding-window inference in numpy);
* :mod:`~hybridvision.deploy.visual`: palette, coloured masks, overlays, mask files;
* :mod:`~hybridvision.deploy.files`: inputs, output names and the loop writing them;
* :mod:`~hybridvision.deploy.cli`: the one command line (``python -m hybridvision.deploy``; also
  behind ``finetune/predict.py``);
* :mod:`~hybridvision.deploy.errors`: :class:`~hybridvision.deploy.errors.UserError`.

Sizes and window placement come from :mod:`hybridvision.geometry`. Export lives in
:mod:`hybridvision.export` (it needs PyTorch); this package must not import torch.
"""
