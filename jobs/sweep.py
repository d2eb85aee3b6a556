"""Ray job entrypoint: run a sweep on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/sweep.py search_spaces/paper_clm.py --tracking-uri http://mlflow:5000 [--resume]

Same arguments as `protscale sweep` (IsoFLOP and transfer grids alike: the space file decides).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from protscale.cli import main  # noqa: E402

if __name__ == "__main__":
    # Inside a Ray job the driver joins the job's cluster: RAY_ADDRESS is set by the job supervisor.
    sys.exit(main(["sweep", *sys.argv[1:], "--ray-address", os.environ.get("RAY_ADDRESS", "auto")]))
