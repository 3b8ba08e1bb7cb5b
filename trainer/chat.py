"""`python -m trainer.chat`: the command lives in trainer/tools/chat.py."""
import sys

from trainer.tools.chat import main

if __name__ == "__main__":
    sys.exit(main())
