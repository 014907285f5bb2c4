"""``python -m streamsvc``: the command line (guarded, so worker processes can import it)."""

import sys

from streamsvc.cli import main

if __name__ == "__main__":
    sys.exit(main())
