"""Route analysis of a run's traces (``pr2 analyze``)::

    python tools/analyze_routes.py RUN_DIR [--out DIR]

Reads ``RUN_DIR/traces/step_*.safetensors`` (written with ``logger.route_traces=true``; format in
``megatron_pr2/rl/traces.py``) and writes ``analysis.md`` plus PNG figures. Needs no megatron
process group: the traces are plain files.
"""

import sys

from megatron_pr2.cli import main

if __name__ == "__main__":
    main(["analyze", *sys.argv[1:]])
