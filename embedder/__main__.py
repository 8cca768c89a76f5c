import sys

from embedder.cli.main import main

sys.exit(main())
