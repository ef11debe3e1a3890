"""Data: the SCAN precomputed format, Karpathy split files, a synthetic dataset in the SCAN
format, the caption vocabulary, training augmentation, and torch Datasets / collate functions
over them."""
from .augment import Augmentation
from .images import ImageFiles, karpathy_split
from .karpathy import KarpathyImage, load_karpathy
from .loaders import (CaptionDataset, ImageCaptionsDataset, ImageDataset, PairDataset,
                      collate_captions, collate_image_captions, collate_images, collate_pairs)
from .scan import RetrievalSplit, load_scan
from .synthetic import make_synthetic
from .vocab import Vocabulary, tokenize

__all__ = ["tokenize", "Vocabulary", "RetrievalSplit", "load_scan", "KarpathyImage",
           "load_karpathy", "ImageFiles", "karpathy_split", "PairDataset", "ImageCaptionsDataset",
           "ImageDataset", "CaptionDataset", "collate_pairs", "collate_image_captions",
           "collate_images", "collate_captions", "make_synthetic", "Augmentation"]
