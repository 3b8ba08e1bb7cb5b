"""`python -m trainer.evaluate`: the command lives in trainer/tools/evaluate.py."""
import sys

from trainer.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
