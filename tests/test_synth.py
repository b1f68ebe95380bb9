"""The synthetic cohort: layout, geometry, determinism, tumours, and that time is what matters."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import label

from data_store.errors import InputError
from data_store.phantom import TISSUES, SynthConfig, synthesize, synthesize_case
from data_store.synth import write_cohort
from tsesnet.cli import main

SMALL = SynthConfig(shape=(16, 48, 48), phases=4)


def _data(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def _best_balanced_accuracy(pos: np.ndarray, neg: np.ndarray) -> float:
    """Best balanced accuracy of one threshold (either direction) separating pos from neg."""
    values = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])[np.argsort(values)]
    pos_below = np.cumsum(is_pos) / pos.size  # fraction of positives <= threshold
    neg_below = np.cumsum(1 - is_pos) / neg.size
    above = (1 - pos_below + neg_below) / 2  # call "positive" above the threshold
    below = (pos_below + 1 - neg_below) / 2
    return float(max(above.max(), below.max(), 0.5))


def _canonical(vol_zyx, affine):
    """File-grid (..., Z, Y, X) -> RAS+ (..., Z=S, Y=A, X=R), the way the store reorients."""
    ornt = nib.io_orientation(affine)
    xyz = np.moveaxis(vol_zyx, (-1, -3), (-3, -1))
    lead = xyz.shape[:-3]
    flat = xyz.reshape(-1, *xyz.shape[-3:])
    out = np.stack([nib.orientations.apply_orientation(v, ornt) for v in flat])
    return np.moveaxis(out.reshape(*lead, *out.shape[-3:]), (-1, -3), (-3, -1))


def test_write_cohort_nnunet_layout(tmp_path):
    ids = write_cohort(tmp_path / "raw", 3, seed=1, config=SMALL, test_cases=1)
    raw = tmp_path / "raw"
    assert ids == ["SYN_000", "SYN_001", "SYN_002"]
    for case_id, split in (("SYN_000", "Tr"), ("SYN_001", "Tr"), ("SYN_002", "Ts")):
        for t in range(4):
            assert (raw / f"images{split}" / f"{case_id}_{t:04d}.nii.gz").is_file()
        assert not (raw / f"images{split}" / f"{case_id}_0004.nii.gz").exists()
        assert (raw / f"labels{split}" / f"{case_id}.nii.gz").is_file()
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == [
        "SYN_000.nii.gz",
        "SYN_001.nii.gz",
    ]

    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["channel_names"].keys() == {"0", "1", "2", "3"}
    assert meta["labels"] == {"background": 0, "tumour": 1}
    assert meta["numTraining"] == 2
    assert meta["file_ending"] == ".nii.gz"
    assert meta["acquisition_times_s"] == [0.0, 60.0, 180.0, 300.0]
    assert meta["synth"]["seed"] == 1
    assert meta["synth"]["config"]["shape"] == [16, 48, 48]

    image, img = _data(raw / "imagesTr" / "SYN_000_0001.nii.gz")
    mask, mimg = _data(raw / "labelsTr" / "SYN_000.nii.gz")
    assert image.dtype == np.int16 and image.shape == (48, 48, 16)  # (i, j, k) = (X, Y, Z)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_allclose(mimg.affine, img.affine)


def test_affine_non_identity_and_consistent_with_zooms(tmp_path):
    write_cohort(tmp_path, 4, seed=0, config=SMALL)
    spacing_xyz = np.array(SMALL.voxel_mm[::-1])
    affines = []
    for n in range(4):
        img = nib.load(str(tmp_path / "imagesTr" / f"SYN_{n:03d}_0000.nii.gz"))
        a = img.affine
        affines.append(a)
        assert not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3])))  # rotated
        np.testing.assert_allclose(np.linalg.norm(a[:3, :3], axis=0), spacing_xyz, rtol=1e-5)
        np.testing.assert_allclose(img.header.get_zooms()[:3], spacing_xyz, rtol=1e-5)
        assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    assert len({tuple(np.round(a.ravel(), 3)) for a in affines}) == 4  # varies per case
    codes = {"".join(nib.aff2axcodes(a)) for a in affines}
    assert codes != {"RAS"}


def test_orientation_puts_breasts_anterior():
    """Whatever the file's orientation, RAS+ reorientation finds the breasts in front of the
    chest wall and the labelled tumours inside the breasts."""
    codes = set()
    for seed in range(5):
        case = synthesize(seed, SMALL)
        codes.add(case.orientation)
        assert "".join(nib.aff2axcodes(case.affine)) == case.orientation
        tissues = _canonical(case.tissues, case.affine)  # (Z, Y, X) with Y to anterior
        y = np.arange(tissues.shape[1])[None, :, None]
        breast_y = np.broadcast_to(y, tissues.shape)[np.isin(tissues, [4, 5])].mean()
        muscle_y = np.broadcast_to(y, tissues.shape)[tissues == TISSUES["muscle"]].mean()
        assert breast_y > muscle_y + 5
    assert len(codes) >= 2


def test_same_seed_same_bytes(tmp_path):
    a = synthesize_case(np.random.default_rng([7, 0]), SMALL)
    b = synthesize_case(np.random.default_rng([7, 0]), SMALL)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    c = synthesize_case(np.random.default_rng([8, 0]), SMALL)
    assert not np.array_equal(a[0], c[0])

    write_cohort(tmp_path / "one", 2, seed=7, config=SMALL)
    write_cohort(tmp_path / "two", 2, seed=7, config=SMALL)
    for rel in ("imagesTr/SYN_001_0002.nii.gz", "labelsTr/SYN_001.nii.gz"):
        x, xi = _data(tmp_path / "one" / rel)
        y, yi = _data(tmp_path / "two" / rel)
        assert np.array_equal(x, y) and np.array_equal(xi.affine, yi.affine)
    # case n is drawn from (seed, n) alone; the file holds the array transposed to (X, Y, Z)
    one, _ = _data(tmp_path / "one" / "imagesTr/SYN_001_0002.nii.gz")
    img, _, _ = synthesize_case(np.random.default_rng([7, 1]), SMALL)
    assert np.array_equal(one, img[2].transpose(2, 1, 0))


def test_image_int16_and_signal_ranges():
    case = synthesize(0)  # default config
    assert case.image.dtype == np.int16 and case.image.shape == (6, 32, 96, 96)
    assert case.mask.dtype == np.uint8 and case.mask.shape == (32, 96, 96)
    assert case.image.min() >= 0
    assert case.spacing == (3.0, 1.75, 1.75)
    assert case.times_s == (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
    air = case.image[0][case.tissues == TISSUES["air"]]
    assert air.mean() < 40  # Rician noise floor, no signal


@pytest.mark.parametrize("shape", [SynthConfig().shape, (8, 32, 32), (16, 32, 32)])
def test_tumour_count_and_size(shape):
    cfg = SynthConfig(shape=shape, phases=2)
    sp = cfg.voxel_mm
    floor = max(cfg.tumour_diameter_mm[0], cfg.min_lesion_voxels_across * max(sp[1:]))
    seen = set()
    for seed in range(8):
        case = synthesize(np.random.default_rng([3, seed]), cfg)
        labels, n = label(case.mask, np.ones((3, 3, 3)))
        assert 1 <= n <= 3 and n == len(case.tumour_diameters_mm)
        seen.add(n)
        voxels = np.bincount(labels.ravel())[1:]
        assert voxels.min() >= cfg.min_lesion_voxels
        assert np.all(case.tissues[case.mask == 1] == TISSUES["tumour"])
        if shape == SynthConfig().shape:
            nominal = np.array(case.tumour_diameters_mm)
            assert np.all((nominal >= floor - 1e-6) & (nominal <= 30.0))
            equivalent = (6 * voxels * np.prod(sp) / np.pi) ** (1 / 3)  # sphere of same volume
            assert np.all((equivalent > 0.6 * floor) & (equivalent < 1.3 * 30.0))
    assert len(seen) >= 2


def test_peak_phase_overlaps_but_kinetics_separate():
    """The property the demo relies on: one phase cannot tell tumours from benign enhancing foci,
    the curve (wash-out: late minus peak) can. Measured on intensities normalised per case as the
    store does (0.1/99.9 percentiles over all phases), pooled over cases."""
    tumour, benign = [], []
    for seed in range(6):
        case = synthesize(np.random.default_rng([0, seed]))
        image = case.image.astype(np.float32)
        lo, hi = np.percentile(image, [0.1, 99.9])
        image = (np.clip(image, lo, hi) - lo) / (hi - lo)
        tumour.append(image[:, case.tissues == TISSUES["tumour"]])  # (T, N)
        benign.append(image[:, case.tissues == TISSUES["benign"]])
    tumour, benign = np.concatenate(tumour, 1), np.concatenate(benign, 1)
    assert tumour.shape[1] > 500 and benign.shape[1] > 200

    peak = int(np.argmax(tumour.mean(1)))
    assert peak in (1, 2)
    per_phase = [_best_balanced_accuracy(tumour[t], benign[t]) for t in range(len(tumour))]
    assert per_phase[peak] <= 0.75, per_phase
    assert max(per_phase) <= 0.85, per_phase  # no single phase separates them
    washout = _best_balanced_accuracy(tumour[-1] - tumour[peak], benign[-1] - benign[peak])
    assert washout >= 0.95, washout
    # the curves: tumours wash out, benign foci keep enhancing
    assert tumour[-1].mean() < tumour[peak].mean() < tumour[0].mean() * 3
    assert benign[-1].mean() > benign[peak].mean()


def test_tsesnet_synth_command(tmp_path, capsys):
    out = tmp_path / "cohort"
    argv = ["synth", str(out), "--cases", "2", "--seed", "5", "--shape", "8", "32", "32"]
    assert main([*argv, "--phases", "3"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 cases" in printed and "SYN_001" in printed
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 6
    # rerun with fewer cases replaces the earlier synthetic cohort, no stale files
    assert main([*argv[:3], "1", *argv[4:]]) == 0
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == 6  # 1 case x 6 phases
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cases", "0"], "--cases 0"),
        (["--cases", "2", "--phases", "1"], "--phases 1"),
        (["--cases", "2", "--shape", "4", "32", "32"], "--shape 4 32 32 is too small"),
        (["--cases", "2", "--seed", "-1"], "--seed -1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, extra, message):
    assert main(["synth", str(tmp_path / "c"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_library_errors_name_the_parameter_and_the_cli_its_flag():
    """Below the CLI an error speaks of the value and the parameter that took it; the command
    line shows the same line naming its flag (`tsesnet.cli` maps one to the other)."""
    with pytest.raises(InputError) as info:
        SynthConfig(phases=1)
    assert info.value.param == "phases" and "--" not in str(info.value)
    assert str(info.value) == "phases 1: need at least 2 (pre-contrast and one post-contrast)"
    assert info.value.naming("--phases").startswith("--phases 1: need at least 2")
    with pytest.raises(InputError, match=r"^seed -1: need a non-negative integer$"):
        write_cohort("unused", 1, seed=-1, config=SMALL)


def test_refuses_foreign_folder_and_bad_split(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_cohort(tmp_path, 1, config=SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="test cases"):
        write_cohort(tmp_path / "new", 2, config=SMALL, test_cases=2)
    with pytest.raises(InputError, match="times_s"):
        SynthConfig(phases=3, times_s=(0.0, 60.0))
