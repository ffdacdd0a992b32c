"""``python -m tests.fake_nydusd``: the real nydusd CLI with the fake tree/device opener."""

import sys

from rafs.daemon.cli import main
from tests.fs_fakes import FakeOpener

if __name__ == "__main__":
    sys.exit(main(opener=FakeOpener()))
