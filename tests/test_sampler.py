"""PatchSampler: determinism, bounds and padding, foreground fraction, augmentation, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_store.geometry import Geometry
from data_store.index import init_store, write_index
from data_store.layouts import CaseSource
from data_store.location import StoreLocation
from data_store.normalize import normalize_intensity
from data_store.sampler import PatchSampler, SamplerConfig
from data_store.source_reader import LoadedCase
from data_store.store import open_store
from data_store.store_writer import write_case

PATCH = (8, 16, 16)


def make_store(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray | None]]):
    """A store of in-memory cases: id -> (image (T, Z, Y, X), mask (Z, Y, X) or None)."""
    location = StoreLocation.parse(root)
    root.mkdir()
    init_store(location)
    for case_id, (image, mask) in cases.items():
        files = tuple(Path(f"/src/{case_id}_{t:04d}.nii.gz") for t in range(image.shape[0]))
        mask_file = Path(f"/src/{case_id}.nii.gz") if mask is not None else None
        source = CaseSource(case_id, files, mask_file, "nnunet")
        sha = {str(f): f"{hash((case_id, str(f))) & (2**64 - 1):064x}" for f in source.files}
        # canonical == file order for this affine: (i, j, k) = (X, Y, Z) needs the transpose
        geometry = Geometry.from_affine(np.eye(4), image.shape[1:][::-1])
        write_case(location, LoadedCase(source, image, mask, geometry, sha))
    write_index(location, 2)
    return open_store(root)


def blob_case(shape=(24, 64, 64), phases=3, blob=(12, 32, 32), size=2, seed=0):
    """Noise with a bright enhancing cube of `size` voxels a side, which is the mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 100, (phases, *shape)).astype(np.int16)  # (T, Z, Y, X)
    mask = np.zeros(shape, np.uint8)
    region = tuple(slice(c, c + size) for c in blob)
    mask[region] = 1
    for t in range(phases):
        image[t][region] = 1000 + 200 * t
    return image, mask


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler") / "store"
    return make_store(
        root,
        {
            "A": blob_case(seed=0),
            "B": blob_case(seed=1, blob=(3, 5, 50)),
            "C": blob_case(seed=2, blob=(20, 60, 2)),
            "small": blob_case(shape=(5, 10, 20), blob=(1, 2, 3), seed=3),
            "unlab": (blob_case(seed=4)[0], None),
            "big": blob_case(seed=5, size=6),  # 0.2 % of voxels: above the 99.9th percentile
        },
    )


def collect(sampler, epoch=0, n=12):
    return list(sampler.patches(epoch, n))


def test_deterministic_by_seed_epoch_rank(store):
    cfg = SamplerConfig(patch=PATCH)
    ids = ["A", "B", "C"]
    a = collect(PatchSampler(store, ids, cfg, seed=1))
    b = collect(PatchSampler(store.path, ids, SamplerConfig(patch=PATCH, cache_bytes=0), seed=1))
    for (ia, ma), (ib, mb) in zip(a, b, strict=True):  # cached and uncached agree exactly
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    other_epoch = collect(PatchSampler(store, ids, cfg, seed=1), epoch=1)
    other_seed = collect(PatchSampler(store, ids, cfg, seed=2))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, other_epoch, strict=True))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, other_seed, strict=True))


def test_ranks_get_disjoint_shards(store):
    cfg = SamplerConfig(patch=PATCH)
    ids = ["A", "B", "C", "small"]
    seen = [
        {PatchSampler(store, ids, cfg, rank=r, world_size=2).where(0, i)[0] for i in range(40)}
        for r in range(2)
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ids)
    lone = PatchSampler(store, ["A"], cfg, rank=1, world_size=2)  # more ranks than cases
    assert lone.shard == ["A"]


@pytest.mark.parametrize("case_id", ["A", "small"])
def test_patch_inside_volume_shapes_and_padding(store, case_id):
    cfg = SamplerConfig(patch=PATCH, augment=False, fg_fraction=0.5)
    sampler = PatchSampler(store, [case_id], cfg, seed=3)
    case = store.read_case(case_id)
    lo, hi = case.percentiles
    _, z, y, x = case.image.shape
    for i, (image, mask) in enumerate(sampler.patches(0, 10)):
        assert image.shape == (3, *PATCH) and mask.shape == PATCH
        assert image.dtype == np.float32 and mask.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        _, start, _ = sampler.where(0, i)
        for a, p, s in zip(start, PATCH, (z, y, x), strict=True):
            assert (0 <= a <= s - p) if s >= p else (s - p <= a <= 0)  # inside, or padded
        src = tuple(
            slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, PATCH, (z, y, x), strict=True)
        )
        dst = tuple(slice(r.start - a, r.stop - a) for r, a in zip(src, start, strict=True))
        want = normalize_intensity(case.image[(slice(None), *src)], lo, hi)
        np.testing.assert_array_equal(image[(slice(None), *dst)], want)
        np.testing.assert_array_equal(mask[dst], case.mask[src])
        if case_id == "small":  # the case minimum pads: normalised to 0, mask 0
            outside = np.ones(PATCH, bool)
            outside[dst] = False
            assert outside.any() and not image[:, outside].any() and not mask[outside].any()


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 1.0])
def test_foreground_fraction(store, fraction):
    cfg = SamplerConfig(patch=PATCH, fg_fraction=fraction)
    sampler = PatchSampler(store, ["A", "B", "C"], cfg, seed=0)
    n = 150
    with_fg = sum(bool(m.any()) for _, m in sampler.patches(0, n))
    flagged = sum(sampler.where(0, i)[2] for i in range(n))
    assert flagged == int(n * fraction)  # exactly the configured fraction
    # random patches (16 % of positions per axis pair) rarely hit a 2x2x2 blob
    assert fraction <= with_fg / n <= fraction + 0.1


def test_same_augmentation_on_every_phase_and_the_mask(store):
    cfg = SamplerConfig(patch=PATCH, fg_fraction=1.0, intensity_shift=(0.0, 0.0))
    sampler = PatchSampler(store, ["big"], cfg, seed=5)
    rotated_or_flipped = 0
    for i, (image, mask) in enumerate(sampler.patches(0, 30)):
        assert mask.any()
        for t in range(image.shape[0]):  # the blob is bright in every phase, where the mask is
            np.testing.assert_array_equal(image[t] > 0.5, mask > 0)
        case_id, start, _ = sampler.where(0, i)
        raw_mask = store.read_case(case_id).mask
        region = tuple(slice(a, a + p) for a, p in zip(start, PATCH, strict=True))
        rotated_or_flipped += not np.array_equal(mask, raw_mask[region])
    assert rotated_or_flipped > 10


def test_in_plane_rotation_only_for_square_patches(store):
    cfg = SamplerConfig(patch=(8, 16, 24), fg_fraction=1.0)
    for image, mask in PatchSampler(store, ["A"], cfg).patches(0, 10):
        assert image.shape == (3, 8, 16, 24) and mask.shape == (8, 16, 24)


def test_unlabelled_case_gives_empty_mask(store):
    _, mask = next(PatchSampler(store, ["unlab"], SamplerConfig(patch=PATCH)).patches(0, 1))
    assert not mask.any()


def test_cache_bounded_in_bytes(store):
    one = store.nbytes("A")
    cfg = SamplerConfig(patch=PATCH, cache_bytes=int(one * 1.5), admit_after=1)
    sampler = PatchSampler(store, ["A", "B", "C"], cfg)
    for _ in sampler.patches(0, 30):
        assert sampler._cached_bytes <= cfg.cache_bytes and len(sampler._cache) <= 1
    assert sampler.stats["whole_reads"] > 1  # evicted and re-read: LRU at work
    cold = PatchSampler(store, ["A", "B"], SamplerConfig(patch=PATCH, cache_bytes=0))
    list(cold.patches(0, 5))
    assert cold.stats == {"hits": 0, "region_reads": 5, "whole_reads": 0}
    warm = PatchSampler(store, ["A", "B"], SamplerConfig(patch=PATCH))
    list(warm.patches(0, 20))
    assert warm.stats["whole_reads"] <= 2 and warm.stats["region_reads"] == 0


def test_torch_dataloader(store):
    cfg = SamplerConfig(patch=PATCH, patches_per_epoch=6)
    sampler = PatchSampler(store, ["A", "B"], cfg, seed=0)
    sampler.set_epoch(2)
    batches = list(torch.utils.data.DataLoader(sampler, batch_size=3))
    assert len(batches) == 2
    image, mask = batches[0]
    assert image.shape == (3, 3, *PATCH) and mask.shape == (3, *PATCH)  # (B, T, z, y, x)
    np.testing.assert_array_equal(image[0].numpy(), sampler.patch(2, 0)[0])


def test_bad_config_and_unknown_case(store):
    with pytest.raises(ValueError, match="fg_fraction"):
        SamplerConfig(fg_fraction=1.5)
    with pytest.raises(ValueError, match="patch"):
        SamplerConfig(patch=(8, 0, 16))
    with pytest.raises(Exception, match="case NOPE"):
        PatchSampler(store, ["NOPE"], SamplerConfig(patch=PATCH))
