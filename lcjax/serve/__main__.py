"""`python -m lcjax.serve`: see lcjax/serve/cli.py."""

import sys

from lcjax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
