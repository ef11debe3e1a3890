"""Retrieval evaluation from a score matrix, vectorised on the matrix's device.

- recall_metrics (any N images x N*c captions), fold_metrics (its mean over contiguous folds),
  coco_1k_5fold, coco_5k, f30k_1k: the DivE / VSE++ protocol (recalls in %).
- eccv_metrics: ECCV Caption, CxC and COCO 1K/5K as the eccv-caption package computes them
  (fractions), with the ground truth that package ships (`pip install 'dive[eval]'`).
"""
from .eccv import eccv_metrics
from .recall import coco_1k_5fold, coco_5k, f30k_1k, fold_metrics, recall_metrics

__all__ = ["recall_metrics", "fold_metrics", "coco_1k_5fold", "coco_5k", "f30k_1k",
           "eccv_metrics"]
