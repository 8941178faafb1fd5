"""Deployment without PyTorch: :mod:`hybridvision.deploy.runtime` (numpy, Pillow, onnxruntime).

Export lives in :mod:`hybridvision.export` (it needs PyTorch); this package must not import torch.
"""
