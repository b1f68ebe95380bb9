"""DCE-MRI cohorts: NIfTI I/O and geometry, layouts, validation, Zarr stores and patch sampling."""
