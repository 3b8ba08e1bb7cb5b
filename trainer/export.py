"""`python -m trainer.export`: the command lives in trainer/tools/export.py."""
import sys

from trainer.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
