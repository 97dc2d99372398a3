"""Evaluations of a trained model: held-out loss and zero-shot multiple-choice accuracy.

* `heldout`: mean held-out loss and the mean loss at every position 0..L-1 (pure jitted
  functions on token arrays, plus a loader for a run's own held-out split).
* `tasks`: HellaSwag, PIQA and ARC-Easy files -> `tasks.Example` (prompt, choices, label); numpy
  and json only, so a bad file fails before JAX starts.
* `multiple_choice`: batched, length-normalised log-likelihood scoring of the choices.
* `workdir`: a training run's workdir -> its config, its latest checkpoint's parameters, and
  every evaluation at once (`evaluate_workdir`).

Command line: ``python -m diloco_jax.evals --workdir=DIR [--hellaswag=FILE ...] [--json]``
(see `docs/evals.md`).

This file imports nothing, so the command can reject bad flags before JAX starts.
"""
