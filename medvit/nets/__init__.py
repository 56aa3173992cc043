"""The volume nets: ``NETS`` (the registry) and ``build_net(ModelConfig)``, which builds the net ``model.name`` names.

Each architecture lives in its own module and configures one of MONAI's nets (never a copy):
``unetr`` (:class:`monai.networks.nets.UNETR`), ``swin_unetr`` (:class:`monai.networks.nets.SwinUNETR`)
and ``unet`` (:class:`monai.networks.nets.BasicUNet`, a small CNN baseline). Architectures MONAI does
not ship are written here on :mod:`medvit.attention`: ``dformer`` (D-Former), ``transunet3d``
(3D TransUNet: nnU-Net CNN with a ViT bottleneck) and ``cswin_unet3d`` (CSwin UNet). Importing this
package registers them all; ``@NETS.register(name)`` adds more.
"""

from medvit.nets import cswin_unet3d, dformer, swin_unetr, transunet3d, unet, unetr  # noqa: F401  (registers the builders)
from medvit.nets.registry import NETS, build_net

__all__ = ["NETS", "build_net"]
