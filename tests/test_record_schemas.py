"""The store's records (index entries, integrity records) and the model's training-data record,
read through the one validator (`data_store.schema`): what earlier releases wrote still reads to
the same values and digests, and a malformed record is refused in one line naming the key."""

from __future__ import annotations

import pytest

from data_store.index import IndexEntry, store_fingerprint
from data_store.integrity import CaseRecord
from tsesnet.common.training_record import TrainingRecord

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64
ARRAY = {
    "shape": [3, 8, 16, 16],
    "dtype": "int16",
    "chunks": [3, 8, 16, 16],
    "sha256": H1,
    "meta_sha256": H2,
    "files": {"c/0/0/0/0": [1234, H3]},
}
MASK = {**ARRAY, "shape": [8, 16, 16], "chunks": [8, 16, 16], "dtype": "uint8", "files": {}}
RECORD_V1 = {"version": 1, "arrays": {"image": ARRAY, "mask": MASK}}
RECORD_V2 = {"version": 2, "arrays": {"image": ARRAY, "mask": MASK}, "attributes": H3}
# An entry as the first release wrote it (no integrity, content, attributes, spacing_assumed,
# split) and one as today's writes it.
ENTRY_V1 = {
    "phases": 3,
    "shape": [8, 16, 16],
    "spacing": [2, 0.7, 0.7],
    "labelled": True,
    "site": None,
    "dtype": "int16",
    "checksums": [["image_0", "ab" * 32], ["mask", "cd" * 32]],
    "fold": 1,
}
ENTRY_V2 = {
    **ENTRY_V1,
    "site": "ISPY1",
    "split": "train",
    "integrity": H1,
    "content": H2,
    "attributes": H3,
    "spacing_assumed": False,
}

# Computed by the hand-written parsers before the records moved to `data_store.schema`.
DIGESTS = {
    1: "9df62a0d05bc5715063dcfcfacef36e8355c0abd6fb86f674189c438b0806e16",
    2: "46441a6e4f533cd189a2b4a403436ef7031e88f9844803d043b57821bb709337",
}
CONTENT = "cebd24e9e7ea66ed1fd5f5a016094ad9c927b6e1f68ce28c8f525b7829f9ebec"


@pytest.mark.parametrize("doc", [RECORD_V1, RECORD_V2], ids=["v1", "v2"])
def test_integrity_records_of_both_versions_read_back_byte_for_byte(doc):
    record = CaseRecord.from_attrs(doc)
    assert record.version == doc["version"] and record.to_attrs() == doc
    assert record.digest() == DIGESTS[doc["version"]] and record.content_digest() == CONTENT
    later = {**doc, "written_by": "a later release"}  # keys it does not know: left alone
    assert CaseRecord.from_attrs(later) == record


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"files": {"../../victim": [1, H1]}}, "image.files: chunk key '../../victim' is not"),
        ({"files": {"c/0": [1, "not-a-digest"]}}, "image.files.c/0[1]: expected a text"),
        ({"files": {"c/0": [-1, H1]}}, "image.files.c/0[0]=-1 is out of range"),
        ({"dtype": "int17"}, "image.dtype: 'int17' is not a numpy dtype"),
        ({"dtype": None}, "image.dtype: expected str"),
        ({"shape": [3, True]}, "image.shape[1]: expected int, got bool"),
        ({"sha256": "A" * 64}, "image.sha256: expected a text matching"),
        ({"files": None}, "image.files: expected dict"),
    ],
)
def test_a_malformed_integrity_record_is_one_line_naming_the_key(change, words):
    doc = {**RECORD_V2, "arrays": {"image": {**ARRAY, **change}}}
    with pytest.raises(ValueError) as err:
        CaseRecord.from_attrs(doc)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_index_entries_of_earlier_releases_read_to_the_same_values():
    old, new = IndexEntry.parse(ENTRY_V1, 3), IndexEntry.parse(ENTRY_V2, 3)
    assert (old.spacing, old.split, old.integrity, old.spacing_assumed) == (
        (2.0, 0.7, 0.7),
        "train",
        None,
        False,
    )
    assert all(isinstance(s, float) for s in old.spacing)
    assert old.checksums == (("image_0", "ab" * 32), ("mask", "cd" * 32))
    assert (new.site, new.integrity, new.attributes) == ("ISPY1", H1, H3)
    no_site = {k: v for k, v in ENTRY_V1.items() if k != "site"}
    assert IndexEntry.parse(no_site, 3) == old
    assert IndexEntry.parse({**ENTRY_V2, "written_by": "later"}, 3) == new
    # Version-1 fingerprints are kept until the index is rewritten: unchanged by the move.
    assert store_fingerprint({"A": old}, 3, 1) == store_fingerprint({"A": old}, 3, 1)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"fold": 3}, "fold 3, not one of the 3 folds"),
        ({"fold": -1}, "fold=-1 is out of range"),
        ({"split": "val"}, "split: expected one of 'train', 'test', got str 'val'"),
        ({"phases": 0}, "phases=0 is out of range; it must be in [1, inf)"),
        ({"shape": [8, 16]}, "shape: expected 3 items"),
        ({"spacing": [2, 0.7, float("nan")]}, "spacing[2]=nan is out of range"),
        ({"labelled": 1}, "labelled: expected bool, got int 1"),
        ({"dtype": ""}, "dtype: expected a non-empty text"),
        ({"checksums": [["image_0"]]}, "checksums[0]: expected 2 items"),
        ({"phases": None}, "phases: expected int, got NoneType None"),
    ],
)
def test_a_malformed_index_entry_is_one_line_naming_the_key(change, words):
    with pytest.raises(ValueError) as err:
        IndexEntry.parse({**ENTRY_V2, **change}, 3)
    assert str(err.value).startswith("index entry") and words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_training_record_reads_and_refuses_in_one_line():
    record = {"phases": [3, 6], "spacing_mm_min": [2, 0.7, 0.7], "orientations": ["RAS"]}
    data, note = TrainingRecord.from_model_config({"training_data": {**record, "later": 1}})
    assert note == "" and data.phases == (3, 6) and data.spacing_mm_min == (2.0, 0.7, 0.7)
    assert data.spacing_mm_max is None and data.orientations == ("RAS",)
    for bad, words in [
        ({"phases": [1, 3]}, "training_data.phases: [1, 3] is not lo <= hi phases, lo >= 2"),
        ({"spacing_mm_max": [0, 1, 1]}, "training_data.spacing_mm_max[0]=0 is out of range"),
        ({"orientations": "RAS"}, "training_data.orientations: expected tuple[str, ...]"),
    ]:
        data, note = TrainingRecord.from_model_config({"training_data": bad})
        assert data is None and words in note and "\n" not in note, note


# `model_config.json`'s "training_data" as releases before the obliquity check wrote it (the
# four keys of the registry's former TRAINING_DATA_KEYS, from `driver.training_data`).
RECORD_BEFORE_OBLIQUITY = {
    "phases": [3, 3],
    "spacing_mm_min": [2.0, 0.7, 0.7],
    "spacing_mm_max": [2.0, 0.75, 0.75],
    "orientations": ["LPS", "RAS"],
}


def test_a_record_written_by_an_older_release_reads_and_warns_as_before():
    record, note = TrainingRecord.from_model_config({"training_data": RECORD_BEFORE_OBLIQUITY})
    assert note == ""
    assert record == TrainingRecord(
        phases=(3, 3),
        spacing_mm_min=(2.0, 0.7, 0.7),
        spacing_mm_max=(2.0, 0.75, 0.75),
        orientations=("LPS", "RAS"),
    )
    # stored again, it is the same JSON, with the key it never had as null
    assert record.as_json() == {**RECORD_BEFORE_OBLIQUITY, "obliquity_deg_max": None}
    assert record.unlike(3, (2.0, 0.7, 0.7), 45.0) == []  # no obliquity recorded: not checked
    assert record.unlike(4, (3.5, 0.7, 0.7)) == [
        "4 phases (trained on 3)",
        "Z spacing 3.5 mm (trained on 2 mm)",
    ]
