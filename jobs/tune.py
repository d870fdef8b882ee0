"""Ray job: search CFCML's hyper-parameters on any cohort (Ray Tune + Optuna TPE + ASHA, MLflow).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --dataset path/to/cohort.yaml --preset men-smoke --data /data/glioma

`jobs/tune_men.py` and `jobs/tune_derm7pt.py` are this job with the built-in cohorts as
defaults. Every option: `python jobs/tune.py --help`; design: docs/platform.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main

if __name__ == "__main__":
    sys.exit(main("jobs/tune.py"))
