"""``python -m act_kernels.inspection ...``: the same as ``act inspect ...``."""
import sys

from ..cli import main

sys.exit(main(["inspect", *sys.argv[1:]]))
