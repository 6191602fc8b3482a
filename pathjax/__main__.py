import sys

from pathjax.cli import main

if __name__ == "__main__":
  sys.exit(main())
