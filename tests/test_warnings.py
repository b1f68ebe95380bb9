"""Prediction warns where the model is likely wrong on a case, and only there: the project's own
synthetic demo cohort (every case in a random orientation, slightly rotated) gets no warning;
a scan at a voxel size far from the training cases' does."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_session):
    """The README's demo cohort (`tsesnet synth data/cohort --cases 10 --test-cases 2 --shape 16
    32 32`, ingested): the raw folder, the store and the record of its training cases."""
    from data_store.ingest import ingest
    from data_store.store import open_store
    from data_store.synth import SynthConfig, write_cohort
    from tsesnet.training.driver import describe_training_cases

    d = tmp_path_factory.mktemp("demo")
    write_cohort(d / "cohort", 10, seed=0, config=SynthConfig(shape=(16, 32, 32)), test_cases=2)
    ingest(d / "cohort", d / "demo.zarr", progress=False)
    train_ids, _ = open_store(str(d / "demo.zarr")).split(0)
    record = describe_training_cases(str(d / "demo.zarr"), train_ids)
    return d / "cohort", d / "demo.zarr", record.as_json()


def _warnings(record: dict, input_path, split=None) -> dict[str, list[str]]:
    """What `predict` puts in each case's `warnings` (the same functions, on the real files)."""
    from tsesnet.common.training_record import TrainingRecord
    from tsesnet.serving.case import _unlike
    from tsesnet.serving.inputs import CaseReader

    model_record, note = TrainingRecord.from_model_config({"training_data": record})
    assert note == ""
    reader = CaseReader.for_input(str(input_path))
    return {c: _unlike(model_record, reader.read(c)) for c in reader.case_ids(split=split)}


def test_the_demo_cohort_gets_no_warning(demo):
    raw, store, record = demo
    assert len(record["orientations"]) > 1  # the cohort's orientations differ case to case
    for source, split in ((store, "test"), (store, None), (raw / "imagesTs", None)):
        found = _warnings(record, source, split)
        assert found and all(w == [] for w in found.values()), found


def test_a_scan_with_far_off_spacing_still_warns(demo, tmp_path):
    raw, _, record = demo
    for f in sorted((raw / "imagesTs").glob("*.nii.gz")):
        img = nib.load(f)
        affine = img.affine.copy()
        affine[:3, :3] *= np.array([1.0, 1.0, 3.0])  # every voxel 3x as long along k
        out = tmp_path / "imagesTs" / f.name
        out.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(out))
    found = _warnings(record, tmp_path / "imagesTs")
    assert found and all(len(w) == 1 and "spacing" in w[0] for w in found.values()), found


def test_the_record_training_writes_is_the_one_prediction_reads(demo):
    """`describe_training_cases` (the writer) and `TrainingRecord.from_model_config` (the reader)
    share one schema: the JSON the registry stores reads back to the same record."""
    import json

    from data_store.store import open_store
    from tsesnet.common.training_record import TrainingRecord
    from tsesnet.training.driver import describe_training_cases

    _, store, _ = demo
    written = describe_training_cases(str(store), open_store(str(store)).split(0)[0])
    stored = json.loads(json.dumps({"training_data": written.as_json()}))
    assert set(stored["training_data"]) == {
        "phases", "spacing_mm_min", "spacing_mm_max", "orientations", "obliquity_deg_max"
    }  # fmt: skip
    assert written.phases[0] >= 2 and written.obliquity_deg_max >= 0
    assert TrainingRecord.from_model_config(stored) == (written, "")
