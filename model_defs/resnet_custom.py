"""ResNet-50 v1.5, as the course project defined it, registered in timm as `resnet50_custom`.

ResNet (He et al. 2015, https://arxiv.org/abs/1512.03385) in the "v1.5" form that torchvision and NVIDIA train:
the stride-2 of each downsampling bottleneck sits on the 3x3 conv, not the first 1x1. Additions used by modern
recipes: stochastic depth (Huang et al. 2016, https://arxiv.org/abs/1603.09382) rising linearly over the blocks,
dropout before the classifier, a zero-initialised last BN gamma in each block (Goyal et al. 2017,
https://arxiv.org/abs/1706.02677), optional BlurPool anti-aliasing (Zhang 2019, https://arxiv.org/abs/1904.11486)
as FFCV's ResNet-50 recipes use it, and optional Squeeze-and-Excitation (Hu et al. 2017,
https://arxiv.org/abs/1709.01507) in each block.

Parameter names match torchvision's `resnet50`, so its state dicts load unchanged; with attn_layer='se' they match
timm's `seresnet50` (same SE module, same place, same name).
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_aa, create_attn, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm's own index rule; timm.models does not re-export it

__all__ = ['CustomResNet', 'CustomBottleneck']


class CustomBottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand; a projection shortcut where the shape changes.

    With blur_pool, a strided block first blurs the inputs of its two strided convs (the 3x3 and the shortcut's 1x1)
    with a 3x3 binomial filter. This is FFCV's placement (its rn50 wraps every strided conv of 16+ input channels, so
    not the stem), chosen because the recipes that use BlurPool are FFCV's and because it is cheap: the convs keep
    their stride. timm's anti-aliased resnets run the 3x3 at stride 1 and blur-subsample after it (Zhang's
    ConvBlurPool): 4x the pixels for those convs, about +25% FLOPs for ResNet-50, and an unblurred shortcut. The blur
    (timm's 'blurpc': BlurPool2d, here at stride 1, zero-padded as FFCV pads) holds no parameters and no saved
    buffers, so the state dict is the plain model's.

    With attn_layer (a timm attention name, 'se' for Squeeze-and-Excitation), the expanded output is reweighted per
    channel after bn3 and before the residual add, where timm's Bottleneck does it and under its name `se`, so that
    the weights of timm's seresnet50 load unchanged.
    """
    expansion = 4

    def __init__(
            self,
            in_chs: int,
            width: int,
            stride: int = 1,
            drop_path_rate: float = 0.,
            blur_pool: bool = False,
            attn_layer: Optional[str] = None,
    ):
        super().__init__()
        out_chs = width * self.expansion
        blur = blur_pool and stride != 1
        self.blur2 = create_aa('blurpc', channels=width, stride=1, enable=blur)
        self.blur_shortcut = create_aa('blurpc', channels=in_chs, stride=1, enable=blur)
        self.conv1 = nn.Conv2d(in_chs, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.se = create_attn(attn_layer, out_chs)  # None without attn_layer
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(self.blur_shortcut(x))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(self.blur2(x))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        return self.relu(self.drop_path(x) + shortcut)


class CustomResNet(nn.Module):
    """ResNet with bottleneck blocks, v1.5 strides, stochastic depth and timm's model contract."""

    def __init__(
            self,
            layers: tuple = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            blur_pool: bool = False,
            attn_layer: Optional[str] = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # stem: 7x7/2 conv and 3x3/2 max pool
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]

        # stages: widths 64-512, stride 2 from the second stage on (blurred first with blur_pool); drop path rises
        # linearly from 0 on the first block to drop_path_rate on the last
        num_blocks = sum(layers)
        block_idx = 0
        in_chs = 64
        reduction = 4
        for stage_idx, (depth, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(depth):
                rate = drop_path_rate * block_idx / max(num_blocks - 1, 1)
                blocks.append(CustomBottleneck(in_chs, width, stride if i == 0 else 1, drop_path_rate=rate,
                                               blur_pool=blur_pool, attn_layer=attn_layer))
                in_chs = width * CustomBottleneck.expansion
                block_idx += 1
            name = f'layer{stage_idx + 1}'
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))

        # head: global pool, dropout, classifier
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

        self.init_weights(zero_init_last=zero_init_last)

    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, CustomBottleneck):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier; num_classes 0 drops it, and global_pool '' also drops the pooling (4-D features)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        # timm's classifier factory: an empty pool type neither pools nor flattens
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Final features and the feature maps of the stem (index 0) and the four stages (1-4).

        Args:
            indices: the last n maps if an int, all if None, else these indices (negative from the end).
            norm: accepted for timm's signature; a ResNet has no final norm to apply.
            stop_early: skip the stages after the last map asked for.
        """
        assert output_fmt == 'NCHW', 'ResNet feature maps are NCHW'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        for index, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last feature map in indices (and the classifier); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in ('layer1', 'layer2', 'layer3', 'layer4')[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so that forward_features still runs through it
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < len(self.feature_info) - 1:  # the features now end earlier, narrower than the head expects
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or (max_index < len(self.feature_info) - 1):
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        # each stage by name: TorchScript cannot iterate a list of modules
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_custom_resnet(variant: str, pretrained: bool = False, **kwargs) -> CustomResNet:
    return build_model_with_cfg(CustomResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet50_custom.untrained': _cfg(),
})


@register_model
def resnet50_custom(pretrained: bool = False, **kwargs) -> CustomResNet:
    """ResNet-50 v1.5 of the course project: bottleneck stages of 3, 4, 6, 3 blocks."""
    return _create_custom_resnet('resnet50_custom', pretrained, layers=(3, 4, 6, 3), **kwargs)
