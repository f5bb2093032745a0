"""Errors raised for bad user input (config keys, input files) and for a training that diverged.

Every message is one line naming the offending file or key (or, for a divergence, the step and
the checkpoint) and what is wrong with it.
"""


class InputError(ValueError):
    """Bad user input: a file or config key that cannot be used as given."""


class TrainingDiverged(InputError):
    """A training stopped because its loss or gradient norm stayed non-finite for more than
    ``train.max_nonfinite_steps`` optimizer steps in a row. An :class:`InputError` because the
    remedy is a setting (``train.lr``, ``train.warmup_steps``, ``train.precision``) and so that
    it ends the job with the same one ``error:`` line in the log and Snakemake's output."""
