"""Ray job: search CFCML's MEN hyper-parameters (Ray Tune + Optuna TPE + ASHA, MLflow).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune_men.py --preset men-smoke --num-samples 3 --epochs 2

`cfcml tune` with the men cohort and preset as defaults. Every option: `python jobs/tune_men.py --help`;
design: docs/platform.md.
"""

import sys

from cfcml.platform.study.options import main

if __name__ == "__main__":
    sys.exit(main(prog="jobs/tune_men.py", defaults={"dataset": "men", "preset": "men"}, synth_size=60))
