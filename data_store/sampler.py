"""Random training patches from a store: foreground oversampling, augmentation, an LRU cache.

Shape legend: T phases, Z Y X voxels of a case, z y x voxels of a patch.

Each patch i of epoch e on rank r draws everything (case, centre, augmentation) from its own
generator seeded by (seed, e, r, i), so the stream is deterministic by (seed, epoch, rank) and
does not depend on how many DataLoader workers share it. Ranks see disjoint case shards:
sorted case IDs ``[rank::world_size]`` (a rank left without a case takes case ``rank % n``).

Foreground oversampling follows nnU-Net: patch i is a foreground patch when
``floor((i + 1) f) > floor(i f)`` (exactly a fraction f of the patches, spread evenly), centred
on a random foreground voxel (from the store's ``foreground`` sample of the mask); the others are
uniform. Patches always lie inside the volume; a case smaller than the patch along an axis is
padded with the case's minimum intensity (normalised: 0) and mask 0, at a random offset.

Augmentation, the same on every phase and on the mask: a flip of each axis with probability
1/2, an in-plane (Y, X) rotation by k x 90 degrees when the patch's Y and X sizes are equal, and
an intensity scale and shift applied to the normalised patch (one draw for all phases, so the
enhancement relative to pre-contrast is kept). Intensities are clipped to the case's shared
0.1 %/99.9 % percentiles and mapped to [0, 1] (`normalize_intensity`) before that.

Cache: each worker keeps an LRU cache of decoded cases, bounded in bytes. What to do on a cache
miss was decided by measurement (6x100x320x320 int16, chunks T x 24 x 64 x 64, Blosc-LZ4):
reading only the patch region costs ~15 ms, decoding the whole case ~0.2-0.4 s (about 20 region
reads). So on a miss the whole case is decoded into the cache when every case of this shard fits
in the cache (it is then never evicted and every later patch is a hit); otherwise the region is
read, and a case is decoded whole only after `admit_after` misses (ski-rental: rent until the
rent paid equals the price), which bounds the cost of thrashing when the cache is too small.
``cache_bytes=0`` always reads regions (the "cold" path of the benchmark).

A cold read decodes the image region and, only when the region meets the foreground's
bounding box (stored at ingest), the mask region, both concurrently: measured on the case
above (machine loaded), image alone 38 ms, mask alone 17 ms, one after the other 70 ms,
concurrently 47 ms; most random patches miss the tumour and skip the mask entirely.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from pydantic.dataclasses import dataclass

from data_store import schema
from data_store.normalize import normalize_intensity
from data_store.store import Store, open_store

__all__ = ["PatchSampler", "SamplerConfig"]


# Positive sizes and counts; finite intensity bounds.
_Size = Annotated[int, Field(ge=1)]
_Scale = Annotated[float, Field(gt=0)]
_Shift = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(kw_only=True, config=schema.STRICT)
class SamplerConfig:
    """How patches are drawn (a pydantic dataclass: the fields' types and ranges are checked when
    it is made, in Python or from the training config's `data` section).

    Attributes:
        patch: patch size (z, y, x) in voxels; the paper's 96 x 96 x 48 is (48, 96, 96).
        fg_fraction: fraction of patches centred on a foreground voxel.
        augment: flips, in-plane 90 degree rotations, intensity scale and shift.
        cache_bytes: per-worker cache of decoded cases (image + mask bytes); 0 disables it.
        intensity_scale: range of the multiplicative intensity augmentation.
        intensity_shift: range of the additive intensity augmentation (normalised units).
        admit_after: cache misses of a case before it is decoded whole, when the shard does not
            fit in the cache (see the module docstring).
        patches_per_epoch: patches per epoch summed over all ranks; iterated as a torch
            IterableDataset, a rank yields its share, ``ceil(patches_per_epoch / world_size)``.
    """

    patch: tuple[_Size, _Size, _Size] = (48, 96, 96)
    fg_fraction: Annotated[float, Field(ge=0, le=1)] = 1 / 3
    augment: bool = True
    cache_bytes: Annotated[int, Field(ge=0)] = 2 * 1024**3
    intensity_scale: tuple[_Scale, _Scale] = (0.9, 1.1)
    intensity_shift: tuple[_Shift, _Shift] = (-0.1, 0.1)
    admit_after: _Size = 16
    patches_per_epoch: _Size = 250

    def __post_init__(self) -> None:
        # What one field's range cannot say: the bounds in order.
        if self.intensity_scale[0] > self.intensity_scale[1]:
            raise ValueError(f"intensity_scale must be lo <= hi, got {self.intensity_scale}")
        if self.intensity_shift[0] > self.intensity_shift[1]:
            raise ValueError(f"intensity_shift must be lo <= hi, got {self.intensity_shift}")


class _CaseMeta:
    """What the sampler needs of a case without decoding it."""

    def __init__(self, store: Store, case_id: str):
        attrs = store.case_attrs(case_id)
        self.shape = store.shape(case_id)  # (T, Z, Y, X)
        self.nbytes = store.nbytes(case_id)
        self.lo, self.hi = (float(p) for p in attrs["percentiles"])
        self.pad = attrs["intensity_min"]
        self.dtype = np.dtype(attrs["dtype"])
        self.foreground = store.foreground(case_id)  # (N, 3) z, y, x
        self.bbox = attrs.get("foreground_bbox")  # [start, stop) per axis, None: no foreground

    def may_hold_foreground(self, region: tuple[slice, slice, slice]) -> bool:
        """Whether a region intersects the foreground's bounding box (else its mask is 0)."""
        if self.bbox is None:
            return False
        return all(r.start < b and a < r.stop for r, (a, b) in zip(region, self.bbox, strict=True))


class PatchSampler(torch.utils.data.IterableDataset):
    """Random augmented patches of a set of cases (also a torch ``IterableDataset``).

    Args:
        store: a `Store` or its path/URL.
        case_ids: the cases to draw from (e.g. ``store.split(fold)[0]``).
        config: a `SamplerConfig`.
        seed: base seed.
        rank: this worker's rank (Ray Train / DDP).
        world_size: number of ranks; cases are sharded by rank.
    """

    def __init__(
        self,
        store: Store | str,
        case_ids: list[str],
        config: SamplerConfig | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.store = open_store(store) if not isinstance(store, Store) else store
        self.config = config or SamplerConfig()
        if not case_ids:
            raise ValueError("PatchSampler needs at least one case")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        for c in case_ids:
            self.store.shape(c)  # InputError naming an unknown case now, not in a worker
        ids = sorted(case_ids)
        self.shard = ids[rank::world_size] or [ids[rank % len(ids)]]
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._meta: dict[str, _CaseMeta] = {}
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._cached_bytes = 0
        self._misses: dict[str, int] = {}
        self._shard_bytes: int | None = None
        self.stats = {"hits": 0, "region_reads": 0, "whole_reads": 0}

    # ------------------------------------------------------------------ public

    def set_epoch(self, epoch: int) -> None:
        """The epoch `__iter__` draws (call it before each epoch, like DistributedSampler)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields this rank's share of ``patches_per_epoch`` (image, mask) tensors, split across
        DataLoader workers."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(wid, self.patches_per_rank(), nw):
            image, mask = self.patch(self.epoch, i)
            yield torch.from_numpy(image), torch.from_numpy(mask)

    def patches_per_rank(self) -> int:
        """This rank's share of an epoch's patches (every rank draws the same number)."""
        return math.ceil(self.config.patches_per_epoch / self.world_size)

    def patches(self, epoch: int, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The first n patches of an epoch on this rank.

        Yields:
            image (T, z, y, x) float32 normalised (then intensity-augmented), and
            mask (z, y, x) float32 in {0, 1} (zeros for an unlabelled case).
        """
        for i in range(n):
            yield self.patch(epoch, i)

    def patch(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch i of an epoch on this rank (see `patches`)."""
        cfg = self.config
        rng, case_id, start, _ = self._draw(epoch, i)
        meta = self.meta(case_id)
        image, mask = self._read(case_id, meta, start)  # (T, z, y, x) raw, (z, y, x) uint8
        scale, shift = 1.0, 0.0
        if cfg.augment:  # flips/rotation as views of the raw patch: no copy until normalising
            image, mask, scale, shift = self._augment(image, mask, rng)
        # clip + [0, 1] with the shared percentiles, then * scale + shift: one gather + 3 passes
        image = normalize_intensity(image, meta.lo, meta.hi, scale=scale, shift=shift)
        return image, mask.astype(np.float32)  # astype copies: contiguous

    def where(self, epoch: int, i: int) -> tuple[str, tuple[int, int, int], bool]:
        """(case ID, patch origin (z, y, x) before augmentation, foreground patch?) of patch i.

        The origin is negative along an axis where the case is smaller than the patch (padding).
        """
        _, case_id, start, fg = self._draw(epoch, i)
        return case_id, start, fg

    def case_at(self, epoch: int, i: int) -> str:
        """The case patch i is drawn from, without reading anything of it."""
        return self._case(epoch, i)[1]

    def _case(self, epoch: int, i: int) -> tuple[np.random.Generator, str]:
        rng = np.random.default_rng([self.seed, epoch, self.rank, i])
        return rng, self.shard[int(rng.integers(len(self.shard)))]

    def _draw(self, epoch: int, i: int):
        """Patch i's generator (after drawing its case and origin), case, origin, fg flag."""
        f = self.config.fg_fraction
        rng, case_id = self._case(epoch, i)
        fg = math.floor((i + 1) * f) > math.floor(i * f)  # exactly a fraction f, spread evenly
        return rng, case_id, self._start(self.meta(case_id), fg, rng), fg

    def meta(self, case_id: str) -> _CaseMeta:
        if case_id not in self._meta:
            self._meta[case_id] = _CaseMeta(self.store, case_id)
        return self._meta[case_id]

    # ------------------------------------------------------------------ sampling

    def _start(self, meta: _CaseMeta, fg: bool, rng: np.random.Generator) -> tuple[int, ...]:
        """Patch origin (z, y, x) in case voxels; negative where the case is smaller (padding)."""
        sizes, patch = meta.shape[1:], self.config.patch
        lo = [min(0, s - p) for s, p in zip(sizes, patch, strict=True)]
        hi = [max(0, s - p) for s, p in zip(sizes, patch, strict=True)]
        if fg and len(meta.foreground):
            centre = meta.foreground[int(rng.integers(len(meta.foreground)))]
            return tuple(
                int(np.clip(c - p // 2, a, b))
                for c, p, a, b in zip(centre, patch, lo, hi, strict=True)
            )
        return tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True))

    def _read(
        self, case_id: str, meta: _CaseMeta, start: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw image (T, z, y, x) and mask (z, y, x) uint8 of a patch, padded where needed."""
        patch = self.config.patch
        src = tuple(
            slice(max(a, 0), min(a + p, s))
            for a, p, s in zip(start, patch, meta.shape[1:], strict=True)
        )
        dst = tuple(slice(r.start - a, r.stop - a) for r, a in zip(src, start, strict=True))
        whole = self._cached(case_id, meta)
        if whole is not None:
            image, mask = whole[0][(slice(None), *src)], None if whole[1] is None else whole[1][src]
        else:
            self.stats["region_reads"] += 1
            # The mask is read only where it can be non-zero (most random patches miss the
            # tumour's bounding box): half of a cold read's cost is the mask's chunks.
            image, mask = self.store.read_region(case_id, src, mask=meta.may_hold_foreground(src))
        t = meta.shape[0]
        if any(r.stop - r.start != p for r, p in zip(src, patch, strict=True)):
            padded = np.full((t, *patch), meta.pad, dtype=meta.dtype)  # (T, z, y, x)
            padded[(slice(None), *dst)] = image
            image = padded
            if mask is not None:
                pm = np.zeros(patch, np.uint8)
                pm[dst] = mask
                mask = pm
        if mask is None:
            mask = np.zeros(patch, np.uint8)  # unlabelled, or away from the foreground
        return image, mask

    def _cached(self, case_id: str, meta: _CaseMeta):
        """The decoded case from the LRU cache, decoding it on a miss when the policy says so."""
        cfg = self.config
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            self.stats["hits"] += 1
            return self._cache[case_id]
        if meta.nbytes > cfg.cache_bytes:
            return None
        self._misses[case_id] = misses = self._misses.get(case_id, 0) + 1
        if self._shard_bytes is None:
            self._shard_bytes = sum(self.store.nbytes(c) for c in self.shard)
        if self._shard_bytes > cfg.cache_bytes and misses < cfg.admit_after:
            return None
        case = self.store.read_case(case_id)
        self.stats["whole_reads"] += 1
        while self._cache and self._cached_bytes + meta.nbytes > cfg.cache_bytes:
            _, (img, msk) = self._cache.popitem(last=False)  # least recently used
            self._cached_bytes -= img.nbytes + (0 if msk is None else msk.nbytes)
        entry = (case.image, case.mask)
        self._cache[case_id] = entry
        self._cached_bytes += meta.nbytes
        return entry

    def _augment(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        """The same flips/rotation on every phase and the mask (views), and one intensity
        (scale, shift) draw for all phases."""
        cfg = self.config
        flips = [a for a in range(3) if rng.random() < 0.5]  # (z, y, x) axes
        k = int(rng.integers(4)) if cfg.patch[1] == cfg.patch[2] else 0
        scale = float(rng.uniform(*cfg.intensity_scale))
        shift = float(rng.uniform(*cfg.intensity_shift))
        if flips:
            image = np.flip(image, axis=[1 + a for a in flips])  # (T, z, y, x)
            mask = np.flip(mask, axis=flips)
        if k:
            image = np.rot90(image, k, axes=(2, 3))  # in-plane (y, x)
            mask = np.rot90(mask, k, axes=(1, 2))
        return image, mask, scale, shift
