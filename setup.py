"""kvtier: semantic memory tiering for the KV caches of LLM inference servers.

`pip install .` builds the cffi extension (kvtier._native, from userspace/kvtier/_native_build.py)
and installs the commands `kvctl` and `kvtierd`.
"""
from setuptools import find_packages, setup

setup(
    name="kvtier",
    version="0.1.0",
    description="Semantic memory tiering for LLM KV caches across HBM, DRAM, CXL, NVMe and a cluster tier",
    license="Apache-2.0",
    python_requires=">=3.11",
    # The fixed top-level layout keeps GPU code in cuda/; it installs as kvtier.cuda.
    package_dir={"": "userspace", "kvtier.cuda": "cuda"},
    packages=find_packages("userspace") + ["kvtier.cuda"],
    package_data={"kvtier": ["data/*", "data/models/*.json"]},
    # the eBPF probes (kvtier.probes finds them in share/kvtier/bpf) and their stand-alone tool
    data_files=[("share/kvtier/bpf", ["bpf/kvheat.bpf.c", "bpf/kvheat.h"]), ("share/man/man8", ["bpf/kvheat.8"])],
    scripts=["bpf/kvheat.py"],
    setup_requires=["cffi>=1.15"],
    cffi_modules=["userspace/kvtier/_native_build.py:ffibuilder"],
    install_requires=["cffi>=1.15", "click>=8.1", "numpy>=1.24", "pyroute2>=0.9",
                      "zstandard>=0.22", "lz4>=4.3", "xxhash>=3.4",  # these three: kvtier.store
                      "msgpack>=1.0", "prometheus-client>=0.17"],  # kvtierd's wire format and metrics
    extras_require={
        "gpu": ["cuda-bindings>=12"],
        "test": ["pytest>=7", "ruff>=0.6"],  # ruff: tools/test lints first
        "plot": ["matplotlib>=3.7"],  # kvctl replay --plot
        # the cluster tier's Mooncake Store client, master, storage node and metadata server (CPU build)
        "cluster": ["mooncake-transfer-engine-non-cuda>=0.3.13"],
        "bench": ["redis>=5"],  # tools/bench_cluster.py's Redis baseline
    },
    entry_points={
        "console_scripts": [
            "kvctl = kvtier.cli:main",
            "kvtierd = kvtier.daemon:main",
        ],
    },
)
