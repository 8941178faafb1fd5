"""Hybrid Transformer-CNN encoders: self-supervised pretraining, segmentation fine-tuning, distillation.

Built on Hugging Face Accelerate.
"""

__version__ = "0.1.0"
