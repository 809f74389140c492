"""Run the R2 replay demo in one process. On a machine without CUDA it uses the project's
test-only CPU shim (``tests/support``), which lets real megatron-core run on gloo."""

import os
import sys
import warnings

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    sys.path.insert(0, REPO_ROOT)
    if torch.cuda.is_available():
        from megatron.core import parallel_state

        torch.distributed.init_process_group(
            "nccl", init_method="tcp://127.0.0.1:29511", rank=0, world_size=1
        )
        parallel_state.initialize_model_parallel()
    else:
        from tests.support.dist import init_single_process

        init_single_process()
    from megatron_pr2.demo import main

    main()
