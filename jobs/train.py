"""Training job entry point: `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny.toml`.

Runs the ranks as Ray Train workers on the cluster the job was submitted to (RAY_ADDRESS, set by Ray for a job;
run directly, it starts an embedded local Ray): elastic between elastic.min_workers and max_workers, restarted from
the latest committed checkpoint after a worker failure or a spot preemption. Any `--section.key=value` after the
config overrides it (see `moe-platform train --help`); `--address` picks another cluster.
Relative paths in the config (e.g. run.storage_path) resolve against the job's working directory.
"""

import sys
from pathlib import Path

# The job's working dir is the repo; make the library importable even where it is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from moe_platform.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "--ray", *sys.argv[1:]]))
