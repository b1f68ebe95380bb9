"""Using a registered model: batch prediction on Ray Data (`predict`), evaluation (`evaluate`).

`predict` reads cases through `inputs` (a store or a NIfTI cohort), writes through `outputs`
(every path checked to lie inside the output folder) and warns about scans unlike the ones the
model was trained on (its `tsesnet.common.training_record`).
"""
