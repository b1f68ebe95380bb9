"""Using a registered model: batch prediction on Ray Data (`predict`), evaluation (`evaluate`)."""
