"""kvtier.cuda: the GPU (HBM) tier through cuda-python.

Installed as the subpackage kvtier.cuda (setup.py maps it to this folder). Everything here imports
without a GPU, a driver or cuda-python; what needs them reports why it is unavailable.
"""
