"""``python -m giblet.bench --probe CASE VARIANT SIZE``: the fresh process in which ``giblet bench`` measures an op's memory."""

import sys

from giblet.bench.ops import probe

if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--probe":
        probe(*sys.argv[2:5])
    else:
        sys.exit("usage: python -m giblet.bench --probe CASE VARIANT SIZE   (internal; use `giblet bench`)")
