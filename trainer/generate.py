"""`python -m trainer.generate`: the command lives in trainer/tools/generate.py."""
import sys

from trainer.tools.generate import main

if __name__ == "__main__":
    sys.exit(main())
