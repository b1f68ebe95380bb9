"""Geometry: canonical orientation, exact round trips, NIfTI read/write, nibabel's real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from nifti_factory import AFFINE_KINDS, make_affine, make_arrays, save_nifti

from data_store.errors import InputError
from data_store.geometry import Geometry
from data_store.layouts import discover
from data_store.nifti import read_nifti, write_nifti
from data_store.source_reader import load_case

NIBABEL_DATA = Path(data_path)
SHAPE = (6, 7, 8)  # file (i, j, k)
SPACING_IJK = (0.7, 0.8, 1.5)


@pytest.mark.parametrize("kind", sorted(AFFINE_KINDS))
def test_round_trip_is_exact(kind):
    geometry = Geometry.from_affine(make_affine(kind, SPACING_IJK), SHAPE)
    image, mask = make_arrays(SHAPE, phases=3)
    for vol in (image, mask, image[:, None]):  # (T, i, j, k), (i, j, k), extra leading axes
        canonical = geometry.to_canonical(vol)
        assert canonical.shape[-3:] == geometry.canonical_shape
        assert canonical.flags.c_contiguous and canonical.dtype == vol.dtype
        back = geometry.to_original(canonical)
        assert back.dtype == vol.dtype and np.array_equal(back, vol)


@pytest.mark.parametrize("kind", sorted(AFFINE_KINDS))
def test_canonical_axes_point_superior_anterior_right(kind):
    affine = make_affine(kind, SPACING_IJK)
    geometry = Geometry.from_affine(affine, SHAPE)
    canon = geometry.canonical_affine[:3, :3]
    # column c (Z, Y, X) is mostly along world axis (S, A, R) = (2, 1, 0), positively
    assert [int(np.argmax(np.abs(canon[:, c]))) for c in range(3)] == [2, 1, 0]
    assert all(canon[2 - c, c] > 0 for c in range(3))
    # every voxel keeps its world position
    vol = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    canonical = geometry.to_canonical(vol)
    for ijk in [(0, 0, 0), (5, 6, 7), (1, 4, 2)]:
        zyx = np.argwhere(canonical == vol[ijk])[0]
        assert np.allclose(affine @ [*ijk, 1], geometry.canonical_affine @ [*zyx, 1])
    # spacing in (Z, Y, X) order, from the column norms
    norms = np.linalg.norm(canon, axis=0)
    assert np.allclose(geometry.spacing, norms)
    assert sorted(geometry.spacing) == pytest.approx(sorted(SPACING_IJK))


def test_spacing_order_for_ras():
    geometry = Geometry.from_affine(make_affine("ras", SPACING_IJK), SHAPE)
    assert geometry.spacing == pytest.approx((1.5, 0.8, 0.7))  # (Z=k, Y=j, X=i)
    assert geometry.canonical_shape == (8, 7, 6)


def test_attrs_are_json_and_round_trip():
    geometry = Geometry.from_affine(make_affine("oblique"), SHAPE)
    attrs = json.loads(json.dumps(geometry.to_attrs()))
    again = Geometry.from_attrs(attrs)
    assert again == geometry
    assert np.array_equal(again.affine, geometry.affine) and again.shape == SHAPE


def test_degenerate_affine_is_an_input_error():
    affine = np.diag([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="degenerate"):
        Geometry.from_affine(affine, SHAPE)


@pytest.mark.parametrize("kind", sorted(AFFINE_KINDS))
def test_write_nifti_reproduces_the_source_file(tmp_path, kind):
    image, mask = make_arrays(SHAPE, phases=2)
    src = save_nifti(tmp_path / "src.nii.gz", image[0], make_affine(kind, SPACING_IJK))
    vol = read_nifti(src)
    geometry = vol.geometry
    out = tmp_path / "out.nii.gz"
    write_nifti(out, geometry.to_canonical(vol.data), geometry)
    back = read_nifti(out)
    assert back.data.shape == vol.data.shape and back.data.dtype == vol.data.dtype
    assert np.array_equal(back.data, vol.data)
    assert np.array_equal(back.affine, vol.affine)  # bit-exact
    assert nib.aff2axcodes(back.affine) == AFFINE_KINDS[kind]
    # a mask (bool in memory) goes back as uint8 on the same grid
    write_nifti(tmp_path / "mask.nii.gz", geometry.to_canonical(mask).astype(bool), geometry)
    written = read_nifti(tmp_path / "mask.nii.gz")
    assert written.data.dtype == np.uint8 and np.array_equal(written.data, mask)


def test_scaled_file_is_float32_with_the_documented_transform(tmp_path):
    raw = make_arrays(SHAPE, phases=1)[0][0]
    path = save_nifti(tmp_path / "scaled.nii", raw, make_affine(), slope_inter=(0.5, -10.0))
    vol = read_nifti(path)
    assert vol.scaling == (0.5, -10.0)
    assert vol.data.dtype == np.float32
    assert np.array_equal(vol.data, raw.astype(np.float32) * np.float32(0.5) - np.float32(10.0))
    assert read_nifti(save_nifti(tmp_path / "plain.nii", raw, make_affine())).scaling is None


# ------------------------------------------------------------- nibabel's real scanner files


def test_example4d_is_a_two_phase_4d_case(tmp_path):
    """example4d.nii.gz: (128, 96, 24, 2) int16, LAS, oblique: all of its 2 volumes are phases."""
    src = NIBABEL_DATA / "example4d.nii.gz"
    (source,) = discover(src)  # a single 4D file is a one-case nifti4d source
    case = load_case(source)
    assert case.image.shape == (2, 24, 96, 128) and case.image.dtype == np.int16
    assert case.mask is None and case.source.phase_present == (True, True)
    expected = np.moveaxis(np.asanyarray(nib.load(src).dataobj), -1, 0)  # (T, i, j, k)
    assert np.array_equal(case.geometry.to_original(case.image), expected)
    out = tmp_path / "export.nii.gz"
    write_nifti(out, case.image, case.geometry)
    back = nib.load(out)
    assert back.shape == (128, 96, 24, 2)
    assert np.array_equal(back.affine, nib.load(src).affine)
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(nib.load(src).dataobj))


def test_big_endian_anatomical_comes_out_native(tmp_path):
    src = NIBABEL_DATA / "anatomical.nii"
    assert nib.load(src).get_data_dtype().byteorder == ">"
    vol = read_nifti(src)
    assert vol.data.dtype == np.dtype("int16") and vol.data.dtype.isnative
    assert np.array_equal(vol.data, np.asanyarray(nib.load(src).dataobj))
    # as the two phases of an nnU-Net case
    for t in (0, 1):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        shutil.copy(src, tmp_path / "imagesTr" / f"anat_{t:04d}.nii")
    (source,) = discover(tmp_path)
    case = load_case(source)
    assert case.image.dtype == np.dtype("int16") and case.image.dtype.isnative
    out = tmp_path / "anat_back.nii"
    write_nifti(out, case.image[0], case.geometry)
    back = nib.load(out)
    assert back.shape == (33, 41, 25) and np.array_equal(back.affine, nib.load(src).affine)
    assert np.array_equal(np.asanyarray(back.dataobj), vol.data)


def test_nifti2_round_trips_exactly(tmp_path):
    src = NIBABEL_DATA / "example_nifti2.nii.gz"
    (source,) = discover(src)
    case = load_case(source)
    assert case.image.shape[0] == 2 and case.geometry.nifti_version == 2
    out = tmp_path / "back.nii.gz"
    write_nifti(out, case.image, case.geometry)
    original, back = nib.load(src), nib.load(out)
    assert isinstance(back, nib.Nifti2Image)
    assert back.shape == original.shape and np.array_equal(back.affine, original.affine)
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(original.dataobj))
    assert back.get_data_dtype() == original.get_data_dtype()


def test_phases_of_different_dtypes_stack_without_loss(tmp_path):
    """int16 pre-contrast + a scaled (float32) post-contrast phase -> float32, values exact."""
    image, _ = make_arrays(SHAPE, phases=2)
    save_nifti(tmp_path / "imagesTr" / "mix_0000.nii.gz", image[0], make_affine())
    save_nifti(
        tmp_path / "imagesTr" / "mix_0001.nii.gz", image[1], make_affine(), slope_inter=(2.0, 1.0)
    )
    (source,) = discover(tmp_path)
    case = load_case(source)
    assert case.image.dtype == np.float32
    original = case.geometry.to_original(case.image)
    assert np.array_equal(original[0], image[0]) and np.array_equal(original[1], image[1] * 2 + 1)
