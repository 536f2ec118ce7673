import pytest
import timm
import torch

from pretrain.models import (ARCHS, TIMM_NAMES, create_model, list_models, load_weights, num_params)
from pretrain.errors import UserError


def test_registry_covers_the_family():
    names = set(list_models())
    for need in ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                 "vit_large_patch16_224", "vit_huge_patch14_224", "vit_base_patch8_224", "vit_base_patch32_224"]:
        assert need in names


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_arch_builds(name):
    # build on the meta device: the full registry at real size without the memory or init time
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
    assert num_params(model) > 0
    assert model.blocks[0].attn.fused_attn, "attention must use the SDPA path"


def test_vit_base_patch16_param_count_is_timms():
    assert num_params(create_model("vit_base_patch16_224", num_classes=1000)) == 86_567_656


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_param_counts_equal_timm(name):
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        theirs = timm.create_model(name, num_classes=1000)
    assert num_params(ours) == num_params(theirs)
    assert set(ours.state_dict()) == set(theirs.state_dict())


SMALL = ["vit_nano_patch4_16", "vit_micro_patch4_32"]


@pytest.mark.parametrize("name", SMALL + ["vit_tiny_patch16_224"])
@pytest.mark.parametrize("pool,pos", [("token", "learned"), ("avg", "sincos")])
def test_forward_backward_finite(name, pool, pos):
    kw = {"img_size": 32, "patch_size": 4} if name == "vit_tiny_patch16_224" else {}
    model = create_model(name, num_classes=7, global_pool=pool, pos_embed=pos, drop_path_rate=0.1, **kw)
    side = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, side, side)
    out = model(x)
    assert out.shape == (2, 7)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if pos == "sincos":
        assert not model.pos_embed.requires_grad and model.pos_embed.grad is None
        assert model.pos_embed.abs().sum() > 0


def test_explicit_architecture_numbers():
    model = create_model("vit_micro_patch4_32", embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0,
                         patch_size=8, img_size=64, num_classes=5, qkv_bias=False)
    assert model.embed_dim == 64 and len(model.blocks) == 3
    assert model.patch_embed.grid_size == (8, 8)
    assert model.blocks[0].attn.qkv.bias is None
    assert model.blocks[0].mlp.fc1.out_features == 128
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = create_model("vit_nano_patch4_16", num_classes=3)
    b = create_model("vit_nano_patch4_16", num_classes=3, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    b.train()
    x = torch.randn(2, 3, 16, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_load_weights_resamples_pos_embed_to_larger_image():
    torch.manual_seed(0)
    src = create_model("vit_micro_patch4_32", num_classes=10)
    dst = create_model("vit_micro_patch4_32", num_classes=4, img_size=48)
    load_weights(dst, src.state_dict(), new_head=True)
    assert dst.pos_embed.shape[1] == 1 + 12 * 12
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # class token slot kept
    assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 4)


def test_load_weights_token_to_avg_pool_moves_norm():
    src = create_model("vit_nano_patch4_16", num_classes=0)
    dst = create_model("vit_nano_patch4_16", num_classes=3, global_pool="avg")
    with torch.no_grad():
        src.norm.weight.fill_(2.0)
    load_weights(dst, src.state_dict(), new_head=True)
    assert torch.all(dst.fc_norm.weight == 2.0)


def test_load_weights_rejects_mismatch():
    src = create_model("vit_nano_patch4_16", num_classes=0)
    dst = create_model("vit_micro_patch4_32", num_classes=0)
    with pytest.raises((UserError, RuntimeError)):
        load_weights(dst, src.state_dict())


def test_unknown_arch_is_user_error():
    with pytest.raises(UserError, match="vit_gigantic"):
        create_model("vit_gigantic")
