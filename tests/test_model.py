import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.data import resolve_data_config
from timm.layers import BlurPool2d

import model_defs  # noqa: F401
import train
import validate
from model_defs import CustomBottleneck
from training.config import UserError, parse_config


def test_registered_in_timm():
    assert 'resnet50_custom' in timm.list_models()
    assert isinstance(timm.create_model('resnet50_custom'), model_defs.CustomResNet)


def test_parameter_count_matches_torchvision_resnet50():
    ours = sum(p.numel() for p in timm.create_model('resnet50_custom').parameters())
    theirs = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert ours == theirs == 25_557_032


def with_random_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and affines, so that every part of the weights matters in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def test_loads_torchvision_weights_and_gives_the_same_outputs():
    torch.manual_seed(0)
    reference = with_random_bn(torchvision.models.resnet50())
    ours = timm.create_model('resnet50_custom')
    ours.load_state_dict(reference.state_dict())  # same names: strict load, no mapping
    ours.eval()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5, rtol=0)


def test_v15_stride_sits_on_the_3x3_conv():
    block = timm.create_model('resnet50_custom').layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_forward_backward_shapes_and_every_parameter_gets_a_gradient():
    model = timm.create_model('resnet50_custom', num_classes=7, zero_init_last=False)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_init_last_zeroes_each_blocks_last_bn_gamma():
    model = timm.create_model('resnet50_custom')
    blocks = [m for m in model.modules() if isinstance(m, CustomBottleneck)]
    assert len(blocks) == 16
    assert all(torch.all(b.bn3.weight == 0) for b in blocks)
    other = timm.create_model('resnet50_custom', zero_init_last=False)
    assert all(torch.all(b.bn3.weight == 1) for b in other.modules() if isinstance(b, CustomBottleneck))


def test_pretrained_cfg_resolves_to_imagenet_preprocessing():
    model = timm.create_model('resnet50_custom')
    cfg = resolve_data_config(model=model)
    assert cfg['input_size'] == (3, 224, 224)
    assert cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bilinear'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    state = model.state_dict()
    assert model.pretrained_cfg['num_classes'] == 1000
    assert model.pretrained_cfg['first_conv'] + '.weight' in state
    assert model.pretrained_cfg['classifier'] + '.weight' in state
    assert model.get_classifier() is model.fc


def test_drop_path_rises_linearly_and_acts_in_train_mode_only():
    # zero_init_last off: with the residual branches zeroed, dropping them would change nothing
    model = timm.create_model('resnet50_custom', num_classes=10, drop_path_rate=0.5, zero_init_last=False)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for b in model.modules() if isinstance(b, CustomBottleneck)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert all(later > earlier for earlier, later in zip(rates, rates[1:]))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = timm.create_model('resnet50_custom', num_classes=10, zero_init_last=False).train()
    assert torch.allclose(plain(x), plain(x))


def test_timm_model_contract():
    model = timm.create_model('resnet50_custom', num_classes=10, in_chans=1, global_pool='avg').eval()
    x = torch.randn(2, 1, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 2048, 1, 1) and model.num_features == 2048
    assert model.forward_head(features, pre_logits=True).shape == (2, 2048)
    model.set_grad_checkpointing(True)
    assert torch.allclose(model.forward_features(x), features)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    assert set(model.group_matcher()) == {'stem', 'blocks'}
    backbone = timm.create_model('resnet50_custom', features_only=True)
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [64, 256, 512, 1024, 2048]
    assert backbone.feature_info.reduction() == [2, 4, 8, 16, 32]


def test_drop_rate_applies_dropout_before_the_classifier():
    model = timm.create_model('resnet50_custom', num_classes=10, drop_rate=0.9).train()
    features = torch.ones(4, 2048, 1, 1)
    assert not torch.allclose(model.forward_head(features), model.forward_head(features))


def test_blur_pool_blurs_the_six_strided_convs_without_new_parameters_or_state():
    plain = timm.create_model('resnet50_custom', zero_init_last=False).eval()
    blurred = timm.create_model('resnet50_custom', zero_init_last=False, blur_pool=True).eval()
    assert not any(isinstance(m, BlurPool2d) for m in plain.modules())
    blurs = [name for name, m in blurred.named_modules() if isinstance(m, BlurPool2d)]
    assert blurs == [f'layer{s}.0.{b}' for s in (2, 3, 4) for b in ('blur2', 'blur_shortcut')]
    assert all(blurred.get_submodule(name).stride == 1 for name in blurs)
    assert sum(p.numel() for p in blurred.parameters()) == 25_557_032
    blurred.load_state_dict(plain.state_dict())  # the same names: strict load
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(plain(x), blurred(x), atol=1e-3)


def test_blur_pool_keeps_every_feature_maps_shape():
    plain = timm.create_model('resnet50_custom', features_only=True).eval()
    blurred = timm.create_model('resnet50_custom', features_only=True, blur_pool=True).eval()
    assert blurred.feature_info.reduction() == [2, 4, 8, 16, 32]
    for size in (64, 57):  # an odd size too: blurring at stride 1 leaves the strided convs' rounding as it was
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert [f.shape for f in blurred(x)] == [f.shape for f in plain(x)]


def test_blur_pool_keeps_the_strides_and_blurs_with_a_zero_padded_binomial_filter():
    block = timm.create_model('resnet50_custom', blur_pool=True).layer3[0]
    assert block.conv2.stride == (2, 2) and block.downsample[0].stride == (2, 2)
    x = torch.randn(1, 512, 8, 8)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(512, 1, 3, 3)
    assert torch.allclose(block.blur_shortcut(x), F.conv2d(x, kernel, padding=1, groups=512), atol=1e-6)


def test_blur_pool_on_a_model_without_it_is_a_clear_error():
    with pytest.raises(UserError, match="model resnet18 does not take these options: .*'blur_pool'"):
        train.build_model(parse_config(['--model', 'resnet18', '--blur-pool']), 10)


def test_se_weights_load_into_timms_seresnet50_and_give_the_same_outputs():
    torch.manual_seed(0)
    ours = with_random_bn(timm.create_model('resnet50_custom', attn_layer='se')).eval()
    reference = timm.create_model('seresnet50', pretrained=False).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 28_088_024
    reference.load_state_dict(ours.state_dict())  # same names: strict load, no mapping
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5, rtol=0)


def test_se_and_blur_pool_combine_with_seresnet50s_state_dict():
    model = timm.create_model('resnet50_custom', num_classes=10, blur_pool=True, attn_layer='se')
    reference = timm.create_model('seresnet50', num_classes=10)
    assert model.state_dict().keys() == reference.state_dict().keys()  # the blurs add no state
    assert sum(isinstance(m, BlurPool2d) for m in model.modules()) == 6
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.layer4[0].se.parameters())


def test_attn_layer_other_than_se_is_refused_in_one_line():
    with pytest.raises(UserError, match="command line: attn_layer must be one of se, got 'eca'"):
        parse_config(['--attn-layer', 'eca'])


def test_attn_layer_on_a_model_without_it_is_a_clear_error():
    with pytest.raises(UserError, match="model test_resnet does not take these options: .*'attn_layer'"):
        train.build_model(parse_config(['--model', 'test_resnet', '--attn-layer', 'se']), 10)


def test_a_checkpoint_with_se_is_rebuilt_with_se_from_its_config():
    trained = timm.create_model('resnet50_custom', num_classes=10, attn_layer='se').eval()
    state = {'config': {'model': 'resnet50_custom', 'attn_layer': 'se'}, 'state_dict': trained.state_dict()}
    args = argparse.Namespace(checkpoint='checkpoint.pth.tar', weights='raw', model=None, num_classes=10,
                              blur_pool=None, attn_layer=None)
    model, _, _ = validate.load_model(args, state)  # strict load: fails without the SE modules
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x))
    # a plain state dict does not say: --attn-layer does
    plain = argparse.Namespace(**dict(vars(args), model='resnet50_custom'))
    with pytest.raises(UserError):
        validate.load_model(plain, trained.state_dict())
    model, _, _ = validate.load_model(argparse.Namespace(**dict(vars(plain), attn_layer='se')), trained.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x))


def test_reset_classifier_without_pool_gives_unpooled_feature_maps():
    model = timm.create_model('resnet50_custom', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(0, '')
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 2048, 2, 2)
        assert torch.equal(out, model.forward_features(x))
    model.reset_classifier(4, 'avg')
    assert model(x).shape == (2, 4)
    model.reset_classifier(0)  # keeps the pooling: 2-D features
    assert model(x).shape == (2, 2048) and model.head_hidden_size == 2048


def test_torchscript_model_gives_the_same_outputs():
    model = timm.create_model('resnet50_custom', num_classes=10, drop_rate=0.2, drop_path_rate=0.1).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6, rtol=0)


@pytest.fixture(scope='module')
def trained_like():
    """A model with random (not zero) last BN gammas, so that every stage changes its input."""
    torch.manual_seed(0)
    return timm.create_model('resnet50_custom', num_classes=10, zero_init_last=False).eval()


def test_forward_intermediates_equal_the_features_only_backbone(trained_like):
    backbone = timm.create_model('resnet50_custom', features_only=True).eval()
    backbone.load_state_dict({k: v for k, v in trained_like.state_dict().items() if not k.startswith('fc.')})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = trained_like.forward_intermediates(x)
        reference = backbone(x)
        assert torch.equal(final, trained_like.forward_features(x))
        assert len(maps) == len(reference) == 5
        assert all(torch.equal(a, b) for a, b in zip(maps, reference))
        picked = trained_like.forward_intermediates(x, indices=[1, -3], stop_early=True, intermediates_only=True)
    assert [m.shape[1] for m in picked] == [256, 512]
    assert torch.equal(picked[1], reference[2])


def test_prune_intermediate_layers_keeps_the_maps_asked_for(trained_like):
    x = torch.randn(1, 3, 64, 64)
    pruned = timm.create_model('resnet50_custom', num_classes=10).eval()
    pruned.load_state_dict(trained_like.state_dict())
    assert pruned.prune_intermediate_layers([1, 2]) == [1, 2]
    assert not list(pruned.layer3.parameters()) and not list(pruned.layer4.parameters())
    with torch.no_grad():
        kept = pruned.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        full = trained_like.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, full))
        assert pruned.num_features == 512 and pruned(x).shape == (1, 512, 8, 8)


def test_features_only_getter_is_built_on_forward_intermediates():
    backbone = timm.create_model('resnet50_custom', features_only=True, feature_cls='getter', out_indices=(1, 2))
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1:] for m in maps] == [(256, 16, 16), (512, 8, 8)]
    assert backbone.feature_info.channels() == [256, 512]
    assert not list(backbone.model.layer3.parameters())  # pruned: the stages after the last map are gone
