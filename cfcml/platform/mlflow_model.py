"""Models-from-code entry point: MLflow runs this file to build the registered model.

Nothing is unpickled when a cfcml model loads: this code (shipped with the model) creates
the wrapper, and `load_context` reads the package's plain data (tensors with
`weights_only=True`, JSON, YAML, NumPy arrays without pickle).
"""

import mlflow

from cfcml.platform.pyfunc import CfcmlModel

mlflow.models.set_model(CfcmlModel())
