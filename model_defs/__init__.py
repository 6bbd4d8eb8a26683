"""Our model definitions; importing this package registers them in timm's model registry."""
from .resnet_custom import CustomBottleneck, CustomResNet

__all__ = ['CustomBottleneck', 'CustomResNet']
