"""Test package. On a machine without CUDA, importing it installs the CPU shim before any test
module (or a spawned test rank unpickling one) imports megatron.core."""

import torch

if not torch.cuda.is_available():
    from tests.support import cpu_shim

    cpu_shim.install()
