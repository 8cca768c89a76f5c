import sys

from embedder.cli import main

sys.exit(main())
