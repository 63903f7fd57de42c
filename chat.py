"""Terminal chat with nanodp: `python chat.py --help` (the same as `nanodp-chat`; the code is nanodp/chat.py)."""

import sys

from nanodp.chat import main

if __name__ == "__main__":
    sys.exit(main())
