"""Ray job: search CFCML's Derm7pt hyper-parameters (Ray Tune + Optuna TPE + ASHA, MLflow).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_derm7pt.py --preset derm7pt-smoke --num-samples 3 --epochs 2

`cfcml tune` with the derm7pt cohort and preset as defaults. Every option: `python jobs/tune_derm7pt.py --help`;
design: docs/platform.md.
"""

import sys

from cfcml.platform.study.options import main

if __name__ == "__main__":
    sys.exit(main(prog="jobs/tune_derm7pt.py", defaults={"dataset": "derm7pt", "preset": "derm7pt"}, synth_size=120))
