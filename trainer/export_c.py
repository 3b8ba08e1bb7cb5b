"""`python -m trainer.export_c`: the command lives in trainer/tools/export_c.py."""
import sys

from trainer.tools.export_c import main

if __name__ == "__main__":
    sys.exit(main())
