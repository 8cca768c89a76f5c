"""`python -m embedder`: the CLI. Guarded, so that importing the package's modules (documentation tools
inspecting it) does not run a command."""

import sys

from embedder.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
