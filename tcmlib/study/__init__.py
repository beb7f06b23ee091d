"""Part II's study, in three modules whose imports point one way (``runner`` and ``analysis`` import
``protocols``; neither imports the other, and ``protocols`` imports neither):

* ``tcmlib.study.protocols``: the protocol, fixed before any run (its docstring states it), and the rules it
  applies to recorded runs: the training length, the tuning rule, the power plan, the runs a stage wants;
* ``tcmlib.study.runner``: the results files, one run's record with its provenance, and :func:`reproduce`,
  which trains what a study's file lacks (several processes may share one study);
* ``tcmlib.study.analysis``: what the chapters read from the recorded runs (paired comparisons, the
  frontier gap, progress, costs); nothing there trains.

Every public name is importable from here: ``from tcmlib.study import comparisons, protocol``.
"""

from __future__ import annotations

from tcmlib.study.analysis import (comparisons, frontier_gap, length_evidence, run_costs, status, total_cpu_hours,
                                   where_from)
from tcmlib.study.protocols import (ABLATION_MARGINS, ABLATION_TERMS, ABLATION_WEIGHTS, EFFECT_OF_INTEREST,
                                    FRONTIER_LOSSES, PAPER_TCM, PRIMARY, SELECTED_SEEDS, STUDIES, TARGET_POWER,
                                    Protocol, cell_length, cells, converged_length, final_seeds, for_backbone,
                                    make_config, plateau_epoch, power_plan, protocol, select_setting,
                                    selected_setting, smoke_plan, stage_configs, training_length, tuning_fell_back,
                                    tuning_means, variant_name, with_plan)
from tcmlib.study.runner import (class_utility, load_plan, load_runs, load_study, plan_path, provenance,
                                 reproduce, results_path, run_as_recorded, run_record, write_plan)

__all__ = ["Protocol", "protocol", "STUDIES", "cells", "stage_configs", "plateau_epoch", "select_setting", "load_runs",
           "run_record", "reproduce", "results_path", "PAPER_TCM", "variant_name", "status", "comparisons",
           "training_length", "selected_setting", "tuning_means", "tuning_fell_back", "total_cpu_hours", "make_config",
           "frontier_gap", "load_study", "where_from", "run_costs", "run_as_recorded", "for_backbone",
           "FRONTIER_LOSSES", "ABLATION_MARGINS", "ABLATION_WEIGHTS", "ABLATION_TERMS", "PRIMARY", "EFFECT_OF_INTEREST",
           "TARGET_POWER", "SELECTED_SEEDS", "converged_length", "cell_length", "length_evidence", "power_plan",
           "write_plan", "load_plan", "plan_path", "with_plan", "final_seeds", "class_utility", "provenance",
           "smoke_plan"]
