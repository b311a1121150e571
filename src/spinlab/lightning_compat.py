"""Every private part of Lightning that spinlab uses, in one place, checked against Lightning 2.6.6.

Lightning offers no public API for these: setting the stop flag its loops read after a step, keeping
its own signal handlers out, the cluster environment a single-device run detected, whether a step is
the one whose metrics reach the loggers, its count of trained epochs and the position in an epoch,
the mesh size of ModelParallelStrategy, the name of a distributed checkpoint's `meta.pt`, the log
record of its process launcher and the text of its resume warning. `loggers.MetricsFile` and
`loggers.CSVLogger` override two private hooks of the CSV writer and fill two private attributes of
the CSV logger; they are listed here too. `missing()` names what an installed Lightning lacks
(tests/test_lightning_compat.py runs it); pyproject.toml allows the checked minor version only.
"""

from __future__ import annotations

import re
import warnings

CHECKED_WITH = "2.6.6"

SHARDED_META = "meta.pt"  # beside a distributed checkpoint's shards: the loops and callbacks
LAUNCHER_LOG = "lightning.fabric.strategies.launchers.subprocess_script"  # logs a child's death
CHILD_DIED = "terminated with code"  # ... in this record
RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"
LOGGER_HOOKS = ("_check_log_dir_exists", "_rewrite_with_new_header")  # ExperimentWriter's, overridden
LOGGER_ATTRIBUTES = ("_experiment", "_fs")  # CSVLogger's, read and set


def epochs_trained(trainer) -> int:
    """Epochs whose training steps are all done: rises before the epoch-end hooks, and is restored
    from a checkpoint saved at an epoch's end or after a step."""
    return trainer.fit_loop.epoch_progress.total.processed


def batch_position(trainer) -> tuple[int, bool]:
    """(batches processed in the current epoch, whether the current one is its last)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.current.processed, progress.is_last_batch


def is_logging_step(trainer) -> bool:
    """Whether the step just taken is one whose metrics Lightning writes to the loggers."""
    return (
        not trainer.fit_loop.epoch_loop._should_accumulate() and trainer._logger_connector.should_update_logs
    )


def request_stop(trainer) -> None:
    """Set what `trainer.received_sigterm` reads: Lightning's loops then raise SIGTERMException
    after the current step, or at the epoch's end."""
    trainer._signal_connector.received_sigterm = True


def keep_signal_handlers_out(trainer) -> None:
    """Lightning installs its SIGTERM (and Slurm requeue) handlers after on_fit_start; make that a
    no-op for this fit."""
    trainer._signal_connector.register_signal_handlers = lambda: None


def cluster_environment(trainer):
    """The cluster environment Lightning detected (SLURMEnvironment under srun); a single-device
    strategy does not hold it, the accelerator connector does."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return env if env is not None else trainer._accelerator_connector.cluster_environment


def set_data_parallel_size(strategy, size: int) -> None:
    """ModelParallelStrategy's data-parallel mesh size (spinlab.strategy: all processes)."""
    strategy._data_parallel_size = size


def quiet_resume_warning() -> None:
    """Lightning warns at every resume after a step that the data loader "is not resumable". It is
    resumable: SelfPlayDataModule skips the batches already trained (the callback logs it once)."""
    warnings.filterwarnings("ignore", message=re.escape(RESUME_WARNING))


def missing() -> list[str]:
    """What this module expects of the installed Lightning and does not find (empty: all there)."""
    import inspect

    import lightning as L
    from lightning.fabric.strategies.launchers import subprocess_script
    from lightning.fabric.utilities import load
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loops import training_epoch_loop
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    expected = {
        "trainer.fit_loop.epoch_progress.total.processed": lambda: epochs_trained(trainer) == 0,
        "trainer.fit_loop.epoch_loop.batch_progress (current.processed, is_last_batch)": lambda: (
            batch_position(trainer) == (0, False)
        ),
        "trainer.fit_loop.epoch_loop._should_accumulate()": lambda: callable(
            trainer.fit_loop.epoch_loop._should_accumulate
        ),
        "trainer._logger_connector.should_update_logs": lambda: isinstance(
            inspect.getattr_static(type(trainer._logger_connector), "should_update_logs"), property
        ),
        "trainer._signal_connector.received_sigterm": lambda: (
            trainer._signal_connector.received_sigterm is False and trainer.received_sigterm is False
        ),
        "trainer._signal_connector.register_signal_handlers()": lambda: callable(
            trainer._signal_connector.register_signal_handlers
        ),
        "trainer._accelerator_connector.cluster_environment": lambda: (
            trainer._accelerator_connector.cluster_environment is not None
        ),
        "ModelParallelStrategy._data_parallel_size": lambda: hasattr(
            ModelParallelStrategy(), "_data_parallel_size"
        ),
        f"lightning.fabric.utilities.load._METADATA_FILENAME == {SHARDED_META!r}": lambda: (
            load._METADATA_FILENAME == SHARDED_META
        ),
        f"the launcher's log record {CHILD_DIED!r} ({LAUNCHER_LOG})": lambda: (
            subprocess_script.__name__ == LAUNCHER_LOG and CHILD_DIED in inspect.getsource(subprocess_script)
        ),
        f"the resume warning {RESUME_WARNING!r}": lambda: (
            RESUME_WARNING in inspect.getsource(training_epoch_loop)
        ),
        f"ExperimentWriter.{' and '.join(LOGGER_HOOKS)}": lambda: all(
            callable(getattr(ExperimentWriter, hook, None)) for hook in LOGGER_HOOKS
        ),
        f"CSVLogger.{' and '.join(LOGGER_ATTRIBUTES)}": lambda: all(
            hasattr(CSVLogger(save_dir="."), name) for name in LOGGER_ATTRIBUTES
        ),
    }
    lacking = []
    for name, check in expected.items():
        try:
            found = check()
        except (AttributeError, ImportError, TypeError):
            found = False
        if not found:
            lacking.append(name)
    return lacking
