"""A study's live progress on the driver's stderr (a terminal, or `ray job logs`): trials x epochs
done of the most the study can train, each running trial's latest objective, elapsed and left.

ASHA and the epoch budget stop trials early, so the total shrinks as trials end and "left" is an
upper bound; the line is printed by the driver, once per reported epoch.
"""

from __future__ import annotations

import math


def study_progress_callback(num_samples: int, max_epochs: int, metric: str, quiet: bool = False):
    """A Tune callback printing `cfcml.engine.progress` lines (None when quiet)."""
    if quiet:
        return None
    from ray import tune

    from ...engine.progress import Progress

    class StudyProgress(tune.Callback):
        def __init__(self):
            self.progress = None

        def __getstate__(self):  # Tune pickles callbacks with the experiment state
            return {"progress": None}

        def _live(self):
            if self.progress is None:
                self.progress = Progress([], max_epochs, metric, unnamed_runs=num_samples)
            return self.progress

        def on_trial_start(self, iteration, trials, trial, **info):
            self._live().add_run(str(trial.trial_id))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress, name = self._live(), str(trial.trial_id)
            progress.add_run(name)  # a restored study's trials start before this callback did
            epoch = int(result.get("epoch", 0) or 0)
            if epoch >= 1:
                progress.epoch_done(name, epoch - 1, float(result.get(metric, math.nan)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial)

        def _end(self, trial):
            progress, name = self._live(), str(trial.trial_id)
            progress.add_run(name)
            progress.run_done(name, int((trial.last_result or {}).get("epoch", 0) or 0))

        def on_experiment_end(self, trials, **info):
            if self.progress is not None:
                self.progress.end_unstarted()
                self.progress.close()

    return StudyProgress()
