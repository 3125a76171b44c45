"""Training job entry point: `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny.toml`.

Any `--section.key=value` after the config overrides it (see `moe-platform train --help`).
"""

import sys
from pathlib import Path

# The job's working dir is the repo; make the library importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from moe_platform.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
