"""`python -m tinyllm` (and `torchrun -m tinyllm`) run the same CLI as the `tinyllm` script."""

import os
import sys

from tinyllm.cli import main

if __name__ == "__main__":
    code = main()
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):  # a torchrun worker
        # Leave without interpreter finalization. The process group is destroyed and every file is
        # closed by now, but gloo's threads can still hold work whose destruction there aborts
        # ("terminate called without an active exception": seen once in the CPU FSDP test), which
        # would turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
