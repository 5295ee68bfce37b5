"""``pretrain-reuse experiment NAME``: the experiments of Liu et al. (NeurIPS 2022) as recipes that
run on any pool, target task and backbone.

=========  =====================================================================================
recipe     rows (one fine-tuning run per row, sweep value and seed)
=========  =====================================================================================
table1     vanilla, co-tuning, reuse of random / greedy-OT / UOT classes, reuse-unlabeled of
           random / greedy-OT / UOT clusters (Table 1)
table2     reuse-unlabeled of UOT clusters for each number of k-means clusters K (Table 2)
table3     vanilla vs reuse of UOT classes on long-tailed target data, per imbalance ratio (Table 3)
table4     reuse of greedy-OT / UOT classes with l2 and cosine costs, with recall (Table 4)
fig3a      reuse of UOT / random classes for each number of selected classes; label-based
           selection of the ``relevant`` classes when given (Fig. 3a)
fig3b      vanilla vs reuse of UOT classes for each fraction of the target training data (Fig. 3b)
fig4a      recall of the ``relevant`` classes against the cost scale eps_c; selection only (Fig. 4a)
fig4b      the pool's classes cut into groups by UOT score, reuse of each group, vs vanilla (Fig. 4b)
knowledge  for each pre-training in ``pretrainings`` (e.g. supervised vs self-supervised weights of
           one architecture): vanilla fine-tuning, its linear probe and a scratch model, then the
           knowledge analysis of Jiang, Cheng & Li (arXiv 2410.08455) per seed, and the correlation
           of the knowledge ratios with test accuracy across all fine-tuned models
=========  =====================================================================================

Everything an experiment computes lands in its folder and is reused by a rerun: features
(``features/``, from ``embed`` unless given), units (``units/``), selections (``selections/``)
and fine-tuning runs (``runs/<row>-seed<s>/``, skipped once ``result.json`` exists and resumed
from their checkpoint otherwise). A folder in which no fine-tuning run finished (an experiment
stopped by an error) may be rerun with other settings: what they would change is removed first.
Given feature stores must hold the samples and labels of ``source`` / ``target``'s training data.
A random selection is drawn with each run's seed, and a low-data or long-tail run (a sweep's or
the ``finetune`` settings') selects with the class means of the images it trains on. The table is
written as ``results.csv``, ``results.md``, ``results.png`` and ``experiment.json``; accuracies are
the final-step test top-1 (mean and sample standard deviation over seeds, left empty for a single
seed) next to the test top-1 at the best validation evaluation, with the number of validation
images it rests on (left empty without any) and the classes they lack. A folder is claimed with
the settings its recipe reads (``claim.READS``) and the content hashes of the weights files and
given feature stores among them, so others may change on a rerun, and a rerun rewrites a
``report.html`` it finds.

The modules, each depending only on those above it: ``config`` (ExperimentConfig), ``recipes``
(the rows of each table), ``table`` (ExperimentTable), ``workspace`` (features, units and
selections the rows share; each row's runs), ``claim`` (which settings own a folder), ``run``
(run_experiment).
"""

from .config import SWEEP_DEFAULTS, ExperimentConfig, load_experiment_config
from .recipes import RECIPES
from .run import run_experiment
from .table import ExperimentTable

__all__ = [
    "RECIPES",
    "SWEEP_DEFAULTS",
    "ExperimentConfig",
    "ExperimentTable",
    "load_experiment_config",
    "run_experiment",
]
