import sys

from streamsvc.cli import main

sys.exit(main())
