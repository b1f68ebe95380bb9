"""The validation protocol of a registered version: what its validation score was measured on.

Two validation Dice values are comparable only when they were measured the same way: the same
store (its fingerprint) and fold, the same validation cases (a smoke run with
`data.max_val_cases=1` scores one case, not the fold), the same sliding window and overlap, and
the same post-processing rule. `ValidationProtocol` holds those, its `digest` (a short sha256 of
them) names the protocol, and both are stored as version tags (`PROTOCOL_TAG`, `protocol.*`), so
that the alias gate (`tsesnet.tracking.registry`) moves `@champion` only between versions of the
same protocol and `tsesnet models show` can list it. Versions registered before protocols were
recorded have no `PROTOCOL_TAG`: their protocol is "unknown".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

PROTOCOL_TAG = "protocol"
UNKNOWN = "unknown"
# MLflow keeps tag values up to 5000 characters on some backends: longer case lists are cut in
# the tag (the digest covers them all, and model_config.json keeps the whole protocol).
_TAG_LIMIT = 4000


@dataclass(frozen=True)
class ValidationProtocol:
    """How a validation score was measured.

    Attributes:
        store_fingerprint: the store's content fingerprint (covers its folds).
        fold: the validation fold.
        val_cases: the case IDs actually validated, sorted (after `data.max_val_cases`).
        window: the sliding window (Z, Y, X), the training patch.
        overlap: the sliding-window overlap.
        postprocess: the rule turning logits into the scored mask, in words.
    """

    store_fingerprint: str
    fold: int
    val_cases: tuple[str, ...]
    window: tuple[int, int, int]
    overlap: float
    postprocess: str

    def as_dict(self) -> dict:
        return {
            "store_fingerprint": str(self.store_fingerprint),
            "fold": int(self.fold),
            "val_cases": sorted(self.val_cases),
            "window": [int(w) for w in self.window],
            "overlap": float(self.overlap),
            "postprocess": self.postprocess,
        }

    @property
    def digest(self) -> str:
        """16 hex digits of the sha256 of the protocol's canonical JSON."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        """The version tags that record it (`PROTOCOL_TAG` is the digest)."""
        cases = ",".join(sorted(self.val_cases))
        if len(cases) > _TAG_LIMIT:
            cases = cases[:_TAG_LIMIT].rsplit(",", 1)[0] + ",..."
        return {
            PROTOCOL_TAG: self.digest,
            "protocol.val_cases": cases,
            "protocol.n_val_cases": str(len(self.val_cases)),
            "protocol.window": "x".join(str(int(w)) for w in self.window),
            "protocol.overlap": f"{float(self.overlap):g}",
            "protocol.postprocess": self.postprocess,
            # the gate also compares these two, tagged since before protocols
            "store_fingerprint": str(self.store_fingerprint),
            "fold": str(int(self.fold)),
        }


def of_tags(tags: dict | None) -> str:
    """The protocol digest a version's tags record, or `UNKNOWN`."""
    return (tags or {}).get(PROTOCOL_TAG) or UNKNOWN


def differences(new: dict, old: dict) -> str:
    """What differs between two versions' protocol tags, in words (empty when nothing shown
    differs: then only the digest does)."""
    parts = []
    if new.get("store_fingerprint") != old.get("store_fingerprint"):
        parts.append(
            f"store fingerprint {new.get('store_fingerprint', '?')} vs "
            f"{old.get('store_fingerprint', '?')}"
        )
    if new.get("fold") != old.get("fold"):
        parts.append(f"fold {new.get('fold', '?')} vs {old.get('fold', '?')}")
    if new.get("protocol.val_cases") != old.get("protocol.val_cases"):
        parts.append(
            f"validated on {new.get('protocol.n_val_cases', '?')} case(s) vs "
            f"{old.get('protocol.n_val_cases', '?')} (other case IDs)"
        )
    for key, what in (("protocol.window", "window"), ("protocol.overlap", "overlap")):
        if new.get(key) != old.get(key):
            parts.append(f"{what} {new.get(key, '?')} vs {old.get(key, '?')}")
    if new.get("protocol.postprocess") != old.get("protocol.postprocess"):
        parts.append("another post-processing rule")
    return "; ".join(parts)
