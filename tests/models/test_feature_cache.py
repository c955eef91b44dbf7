"""FeatureCache: same loss and gradients with and without it, hits counted, files reused by a new cache object,
fingerprints that keep towers apart, the LRU bound, and refusals (trainable tower, augmentation, bad files)."""

import copy

import pytest
import torch
from torch import nn

from mrgfast.data.images import ImageConfig
from mrgfast.models import ViT
from mrgfast.models.feature_cache import FeatureCache, check_no_augmentation, encoder_fingerprint, tensor_digest
from mrgfast.models.multimodal import MultimodalLM
from mrgfast.ops.linear_cross_entropy import linear_cross_entropy
from tests.models.test_multimodal import IMAGE, PATCH, build_recipe, items, pack, tokenizer  # noqa: F401
from tests.ops.op_cases import assert_close


def frozen_vit(seed: int = 0) -> ViT:
    """A tiny frozen ViT (CLS + 16 patches of dim 16)."""
    torch.manual_seed(seed)
    return ViT(IMAGE, PATCH, dim=16, depth=1, heads=2).requires_grad_(False)


def images(count: int, seed: int = 0) -> torch.Tensor:
    """Random images [count, 3, IMAGE, IMAGE]."""
    return torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: MultimodalLM, batch) -> tuple:
    """The fused next-token loss of a batch (as training computes it) and the gradients it leaves."""
    model.zero_grad(set_to_none=True)
    hidden = model(batch)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.decoder.lm_head.weight,
                                batch.labels.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def with_cache(model: MultimodalLM, cache: FeatureCache) -> MultimodalLM:
    """The same modules (shared weights) assembled with a feature cache."""
    return MultimodalLM(model.decoder, model.vision, dict(model.adapters), feature_cache=cache)


def test_same_loss_and_gradients_with_and_without_cache(tokenizer, tmp_path):  # noqa: F811
    """PeFoMed step: identical loss and gradients uncached, on the cache's first pass (misses) and second (hits)."""
    recipe = build_recipe("pefomed", tokenizer)
    batch = pack(recipe, tokenizer, items(recipe))
    plain_loss, plain_grads = loss_and_grads(recipe.model, batch)
    cache = FeatureCache(tmp_path)
    cached = with_cache(recipe.model, cache)
    for expected_hits in (0, 6):  # 3 samples x 2 views
        loss, grads = loss_and_grads(cached, batch)
        assert cache.hits == expected_hits and cache.stats["misses"] == 6
        assert_close(loss, plain_loss, torch.float32, "loss")
        assert set(grads) == set(plain_grads)
        for name, grad in grads.items():
            assert_close(grad, plain_grads[name], torch.float32, f"grad {name}")


def test_disk_cache_survives_a_new_cache_object(tmp_path):
    """A new FeatureCache on the same directory (as a new process would build) serves the features from disk."""
    vit, pixels = frozen_vit(), images(3)
    first = FeatureCache(tmp_path).features(vit, pixels)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    fresh = FeatureCache(tmp_path)
    again = fresh.features(vit, pixels)
    assert fresh.stats == {"hits": 0, "disk_hits": 3, "misses": 0}
    assert torch.equal(again.features, first.features) and torch.equal(again.pooled, first.pooled)
    assert (again.grid, again.cls) == (first.grid, first.cls)
    fresh.features(vit, pixels)  # now from memory
    assert fresh.stats["hits"] == 3 and fresh.hits == 6


def test_features_equal_the_encoder_and_duplicates_encode_once():
    """Mixed hits and misses come back in input order, equal to the encoder's; repeated images run once."""
    vit, pixels = frozen_vit(), images(4)
    cache = FeatureCache()
    cache.features(vit, pixels[:2])
    mixed = torch.stack([pixels[3], pixels[0], pixels[3], pixels[1], pixels[2]])
    got = cache.features(vit, mixed)
    assert cache.stats == {"hits": 2, "disk_hits": 0, "misses": 4}  # 2 then the 2 distinct new ones
    with torch.no_grad():
        expected = vit(mixed)
    assert_close(got.features, expected.features, torch.float32, "features")
    assert_close(got.pooled, expected.pooled, torch.float32, "pooled")


def test_fingerprint_keeps_towers_apart(tmp_path):
    """Other weights or other settings miss; an identical copy of the tower hits; the image key is its content."""
    vit, pixels = frozen_vit(0), images(2)
    cache = FeatureCache(tmp_path)
    cache.features(vit, pixels)
    cache.features(frozen_vit(1), pixels)  # same architecture, other weights
    assert cache.stats["misses"] == 4
    other = ViT(IMAGE, PATCH, dim=16, depth=1, heads=2, pos_embed="sincos").requires_grad_(False)
    assert encoder_fingerprint(other) != encoder_fingerprint(frozen_vit(0))
    cache.features(copy.deepcopy(vit), pixels)
    assert cache.stats["hits"] == 2
    assert len({p.parent for p in tmp_path.rglob("*.safetensors")}) == 2  # one directory per fingerprint
    assert tensor_digest(pixels[0]) != tensor_digest(pixels[0].double())  # dtype is part of the key
    assert tensor_digest(pixels[0]) != tensor_digest(pixels[0].reshape(3, IMAGE * IMAGE))  # and the shape


def test_memory_lru_is_bounded_by_bytes():
    """max_bytes holds two entries: the least recently used one is evicted, counters and bytes follow."""
    vit, pixels = frozen_vit(), images(3)
    entry_bytes = (17 * 16 + 16) * 4  # features [17, 16] + pooled [16], fp32
    cache = FeatureCache(max_bytes=2 * entry_bytes)
    cache.features(vit, pixels[:2])
    cache.features(vit, pixels[:1])  # image 0 is now the most recent
    cache.features(vit, pixels[2:])  # evicts image 1
    assert cache.bytes == 2 * entry_bytes and len(cache.memory) == 2
    cache.features(vit, pixels[1:2])
    assert cache.stats == {"hits": 1, "disk_hits": 0, "misses": 4}
    assert FeatureCache(max_bytes=0).features(vit, pixels).features.shape == (3, 17, 16)  # memory off still works


def test_refuses_trainable_towers_and_augmentation():
    """A trainable tower cannot be cached (ValueError naming a trainable weight); neither can augmented images."""
    trainable = ViT(IMAGE, PATCH, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="FeatureCache: ViT is trainable \\(cls_token, pos_embed, patch_embed.weight"):
        FeatureCache().features(trainable, images(1))
    with pytest.raises(ValueError, match="only a frozen encoder's features can be cached"):
        MultimodalLM(_decoder(), trainable,
                     {"image": nn.Linear(16, 32)}, feature_cache=FeatureCache())
    with pytest.raises(ValueError, match="ImageConfig\\(augment=True\\)"):
        check_no_augmentation(ImageConfig(augment=True))
    check_no_augmentation(ImageConfig())


def test_bad_cache_file_is_named(tmp_path):
    """A corrupt file in the cache directory raises ValueError naming it."""
    vit, pixels = frozen_vit(), images(1)
    FeatureCache(tmp_path).features(vit, pixels)
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{path.name} is not a feature-cache file"):
        FeatureCache(tmp_path).features(vit, pixels)
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
        FeatureCache(max_bytes=-1)


def _decoder():
    """A tiny Decoder for the construction checks."""
    from tests.models.test_multimodal import tiny_decoder
    return tiny_decoder(64)


def test_repeated_images_encode_once(tokenizer):  # noqa: F811
    """DPO's padded layout repeats each pair's images: with a cache the tower runs once per distinct image."""
    recipe = build_recipe("pefomed", tokenizer)
    cache = FeatureCache()
    model = with_cache(recipe.model, cache)
    pixels = pack(recipe, tokenizer, items(recipe)).pixel_values  # [3 samples, 2 views, C, H, W]
    model.encode(torch.cat([pixels, pixels]))
    assert cache.stats["misses"] == 6 and cache.stats["hits"] == 0  # 12 images, 6 distinct, each encoded once
