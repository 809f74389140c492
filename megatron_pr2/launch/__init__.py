"""Multi-node launches of the GRPO trainer through nemo-run (``pr2 launch``).

:mod:`~megatron_pr2.launch.spec` is plain data; :mod:`~megatron_pr2.launch.nemo` imports
nemo-run only when called, so the package imports without the ``launch`` extra.
"""
