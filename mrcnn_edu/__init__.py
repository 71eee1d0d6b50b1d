"""mrcnn_edu: Mask R-CNN (He, Gkioxari, Dollár, Girshick, ICCV 2017) from scratch, for learning.

One concept per module, named after the paper's term:

- ``boxes``      box conventions, IoU, the box coder, NMS
- ``anchors``    RPN anchors (C4 and FPN)
- ``matching``   anchor / RoI to ground-truth matching and balanced sampling
- ``ops``        RoIPool, RoIWarp, RoIAlign (PyTorch, and a CuPy kernel for CUDA)
- ``backbone``   ResNet / ResNeXt, FPN
- ``rpn``        the Region Proposal Network
- ``roi_heads``  the pooler, box head, mask head, keypoint head
- ``data``       the synthetic shapes dataset, the COCO dataset, transforms
- ``evaluation`` COCO evaluation through pycocotools
- ``engine``     training (single GPU, torchrun + DDP), checkpoints
- ``visualize``  matplotlib drawing of everything above

Submodules are imported on demand (``from mrcnn_edu import boxes``) so that importing the
package stays cheap.
"""
__version__ = "0.1.0"
