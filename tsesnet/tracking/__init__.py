"""MLflow: where runs go (`runs`), their plots (`plots`), the model registry (`registry`) and the
pyfunc flavour of a registered model (`pyfunc`, MLflow "models from code")."""
