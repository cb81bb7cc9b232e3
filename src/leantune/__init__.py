"""leantune: efficient fine-tuning of transformer language models from one validated config."""

import os

# transformers 5 swaps some layers (activations, norms) for kernels it downloads from the hub at run time
# (`kernels-community/*`) when the `kernels` package is installed, which transformers itself requires. On
# CUDA that makes an offline run fail at the first forward ("not available in the local cache ... offline
# mode"), and online it runs code fetched at run time that no config or artefact records. leantune runs
# the models' own PyTorch code unless the user asks otherwise (USE_HUB_KERNELS=YES).
os.environ.setdefault("USE_HUB_KERNELS", "NO")

__version__ = "0.1.0"
