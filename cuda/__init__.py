"""kvtier.cuda: the GPU (HBM) tier through cuda-python.

Installed as the subpackage kvtier.cuda (setup.py maps it to this folder). Everything here imports
without a GPU, a driver or cuda-python; what needs them reports why it is unavailable.
"""
import pkgutil

# Run from the repository root (`python -m pytest`), this folder is found as the top-level package
# `cuda` and would hide cuda-python's `cuda` namespace package; extending the path keeps
# `cuda.bindings` importable from site-packages.
__path__ = pkgutil.extend_path(__path__, __name__)
