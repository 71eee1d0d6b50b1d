"""Data: the synthetic COCO-format set (``shapes``), the COCO loader (``coco``), transforms.

Import the submodules directly (``from mrcnn_edu.data.coco import COCODataset``); this package
imports nothing itself, so ``python -m mrcnn_edu.data.shapes`` workers start without torch.
"""
