"""The private parts of Lightning that spinlab uses (spinlab.lightning_compat) are all there."""

import lightning
import pytest

from spinlab import lightning_compat


def test_the_installed_lightning_has_every_private_part_spinlab_uses():
    lacking = lightning_compat.missing()
    assert not lacking, (
        f"lightning {lightning.__version__} lacks what spinlab.lightning_compat uses (checked against "
        f"{lightning_compat.CHECKED_WITH}): {'; '.join(lacking)}. Install lightning "
        f"{lightning_compat.CHECKED_WITH}, or port spinlab/lightning_compat.py to this version."
    )


@pytest.mark.parametrize(
    "owner, name, reported",
    [
        (
            "lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop",
            "_should_accumulate",
            "trainer.fit_loop.epoch_loop._should_accumulate()",
        ),
        (
            "lightning.pytorch.trainer.connectors.logger_connector.logger_connector._LoggerConnector",
            "should_update_logs",
            "trainer._logger_connector.should_update_logs",
        ),
        (
            "lightning.fabric.utilities.load",
            "_METADATA_FILENAME",
            "lightning.fabric.utilities.load._METADATA_FILENAME == 'meta.pt'",
        ),
        (
            "lightning.pytorch.loggers.csv_logs.ExperimentWriter",
            "_rewrite_with_new_header",
            "ExperimentWriter._check_log_dir_exists and _rewrite_with_new_header",
        ),
    ],
)
def test_a_lightning_without_one_of_them_is_named(monkeypatch, owner, name, reported):
    from hydra.utils import get_object

    target = get_object(owner)
    for klass in getattr(target, "__mro__", [target]):  # where the attribute is defined
        if name in vars(klass):
            monkeypatch.delattr(klass, name)
            break
    assert reported in lightning_compat.missing()
