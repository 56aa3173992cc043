"""Training losses that are more than a MONAI loss configured.

``HungarianMaskLoss`` (:mod:`medvit.losses.hungarian`): the set loss of a mask-classification
decoder (:class:`medvit.nets.mask_transformer.MaskTransformerDecoder`), queries matched to the
classes present in the label.
"""

from medvit.losses.hungarian import HungarianMaskLoss

__all__ = ["HungarianMaskLoss"]
