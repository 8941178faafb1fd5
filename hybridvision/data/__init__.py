"""Data layer: image/mask reading, folder and Hugging Face datasets, synthetic shapes, transforms, loaders.

Every dataset yields sample dicts ``{"image": (C, H, W) float32, "mask": (H, W) int64, "id": str}``
(no ``"mask"`` when unlabelled); transforms see ``tv_tensors.Image`` / ``tv_tensors.Mask``.
"""

from hybridvision.data.folder import ImageFolderDataset, SegmentationFolderDataset, split_by_ids
from hybridvision.data.hf import HFSegmentationDataset, HFStreamingDataset, load_hf_dataset
from hybridvision.data.io import (
    IMAGE_EXTENSIONS,
    apply_transform,
    check_mask_values,
    image_to_tensor,
    mask_to_tensor,
    read_image,
    read_mask,
)
from hybridvision.data.loader import build_dataloader, seed_worker
from hybridvision.data.synthetic import SHAPE_CLASSES, ShapeClass, ShapesRendering, SyntheticShapesDataset
from hybridvision.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AlignedResize,
    PerImageNormalize,
    RandomResize,
    RandomRot90,
    RandomScale,
    Window,
    build_seg_transforms,
)

__all__ = [
    "AlignedResize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SHAPE_CLASSES",
    "HFSegmentationDataset",
    "HFStreamingDataset",
    "ImageFolderDataset",
    "PerImageNormalize",
    "RandomRot90",
    "RandomResize",
    "RandomScale",
    "SegmentationFolderDataset",
    "ShapeClass",
    "ShapesRendering",
    "SyntheticShapesDataset",
    "Window",
    "apply_transform",
    "build_dataloader",
    "build_seg_transforms",
    "check_mask_values",
    "image_to_tensor",
    "load_hf_dataset",
    "mask_to_tensor",
    "read_image",
    "read_mask",
    "seed_worker",
    "split_by_ids",
]
