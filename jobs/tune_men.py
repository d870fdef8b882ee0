"""Ray job: search CFCML's MEN hyper-parameters (Ray Tune + Optuna TPE + ASHA, MLflow).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_men.py --preset men-smoke --num-samples 3 --epochs 2

Every option: `python jobs/tune_men.py --help`; design: docs/platform.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main

if __name__ == "__main__":
    sys.exit(main("jobs/tune_men.py", dataset="men", preset="men", synth_size=60))
