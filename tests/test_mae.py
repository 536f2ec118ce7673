"""The MAE model and task: patch geometry, masking, loss on hidden patches only, seeded masks, groups."""
import pytest
import torch

from pretrain.config import load_config
from pretrain.models.mae import patchify, random_masking, unpatchify
from pretrain.tasks.mae import MaeTask, mask_noise

TINY = ["model.arch=vit_nano_patch4_16", "task.kind=mae", "mae.decoder_embed_dim=32", "mae.decoder_depth=1",
        "mae.decoder_num_heads=2"]


def _task(*extra):
    torch.manual_seed(0)
    return MaeTask(load_config(None, TINY + list(extra)), 0)


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 4)  # (B, L, p*p*C)
    assert p.shape == (2, 16, 48)
    assert torch.equal(unpatchify(p, 4, 3), x)
    # patch 1 is the second patch of the first row, pixels (p, p, C) inside it
    assert torch.equal(p[0, 1].view(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))


def test_random_masking_keeps_the_lowest_noise():
    x = torch.arange(2 * 8).float().view(2, 8, 1)
    noise = torch.rand(2, 8, generator=torch.Generator().manual_seed(1))
    vis, mask, ids_restore = random_masking(x, 0.75, noise)
    assert vis.shape == (2, 2, 1) and mask.sum().item() == 12
    for b in range(2):
        keep = noise[b].argsort()[:2]
        assert torch.equal(vis[b, :, 0], x[b, keep, 0])
        assert mask[b, keep].sum() == 0


def test_encoder_sees_only_visible_patches():
    task = _task()
    seen = []
    task.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    loss, metrics = task(torch.randn(3, 3, 16, 16), None, step=0)
    assert seen == [torch.Size([3, 1 + 4, 32])]  # class token + 25% of 16 patches
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert metrics["mask_ratio"].item() == pytest.approx(0.75)


def test_loss_ignores_visible_patches():
    task = _task("mae.norm_pix_loss=false")
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1
    base = task.loss(imgs, pred, mask)
    pred2 = pred.clone()
    pred2[:, 1::2] += 100.0  # visible patches only
    assert task.loss(imgs, pred2, mask).item() == pytest.approx(base.item())
    pred2[:, 0] += 1.0  # a hidden patch
    assert task.loss(imgs, pred2, mask).item() != pytest.approx(base.item())
    # perfect prediction of the pixels -> zero loss
    assert task.loss(imgs, patchify(imgs, 4), mask).item() == pytest.approx(0.0, abs=1e-10)


def test_masks_are_a_function_of_seed_step_rank():
    a = mask_noise(0, 5, 1, 4, 16, "cpu")
    assert torch.equal(a, mask_noise(0, 5, 1, 4, 16, "cpu"))
    for other in [(1, 5, 1), (0, 6, 1), (0, 5, 0)]:
        assert not torch.equal(a, mask_noise(*other, 4, 16, "cpu"))
    task = _task()
    torch.manual_seed(123)  # the global RNG does not matter
    l1, _ = task(torch.ones(2, 3, 16, 16), None, step=7)
    torch.manual_seed(456)
    l2, _ = task(torch.ones(2, 3, 16, 16), None, step=7)
    assert l1.item() == l2.item()


def test_param_groups_exclude_bias_norm_pos_tokens():
    task = _task()
    groups = task.param_groups(load_config(None, TINY))
    names = {id(p): n for n, p in task.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for n in ["encoder.pos_embed", "encoder.cls_token", "mask_token", "encoder.blocks.0.norm1.weight",
              "encoder.blocks.0.attn.qkv.bias", "decoder_norm.bias"]:
        assert n in no_decay, n
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "decoder_pred.weight" in decay
    assert "decoder_pos_embed" not in dict(task.named_parameters())  # fixed: a buffer, never trained
    assert set(task.state_dict()) >= {"encoder.patch_embed.proj.weight", "decoder_embed.weight"}
    assert not any(k.startswith("encoder.head.") and task.state_dict()[k].numel() for k in task.state_dict())


def test_reconstruction_pastes_visible_patches():
    task = _task("mae.norm_pix_loss=false").eval()
    imgs = torch.randn(2, 3, 16, 16)
    noise = mask_noise(0, 0, 0, 2, 16, "cpu")
    masked, recon = task.reconstruct(imgs, noise)
    _, mask, _ = random_masking(torch.zeros(2, 16, 1), 0.75, noise)
    vis = (1 - mask).bool()
    assert torch.allclose(patchify(recon, 4)[vis], patchify(imgs, 4)[vis])
    assert patchify(masked, 4)[~vis].abs().sum() == 0


def test_flops_count_the_visible_encoder():
    from pretrain.models import flops_per_image

    task = _task()
    assert flops_per_image(task.encoder) > 0
    enc_only_full = flops_per_image(task.encoder)
    assert task.flops_per_image() > 0
    assert task.flops_per_image() != enc_only_full
