"""hybridvision: self-supervised pretraining, segmentation fine-tuning and distillation of
hybrid Transformer-CNN encoders, on Hugging Face Accelerate."""

__version__ = "0.1.0"
