"""Ray job: search CFCML's hyper-parameters on any cohort (Ray Tune + Optuna TPE + ASHA, MLflow).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --dataset path/to/cohort.yaml --preset men-smoke --data /data/glioma

`cfcml tune` as a script for `ray job submit`; `jobs/tune_men.py` and `jobs/tune_derm7pt.py` are
this job with the built-in cohorts as defaults. Every option: `python jobs/tune.py --help`;
design: docs/platform.md.
"""

import sys

from cfcml.platform.study.options import main

if __name__ == "__main__":
    sys.exit(main(prog="jobs/tune.py"))
