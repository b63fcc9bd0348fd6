"""Implementations of the python-backend models in the Triton repository.

Each generated `model.py` is a one-line import of a `TritonPythonModel` from here, so the code is
versioned with the package and unit-testable: the numpy logic lives in plain functions, and
`triton_python_backend_utils` is only imported inside the server process.
"""
