"""The RoI heads of Figure 4: the pooler, the box branch, the mask branch, the keypoint head."""
