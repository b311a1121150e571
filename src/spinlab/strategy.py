"""FSDP2 through Lightning: every process one data-parallel shard of the model.

Lightning's ModelParallelStrategy shards whatever `configure_model` asks for (PolicyModule applies
`fully_shard` per decoder layer, then on the root); this subclass fixes its mesh to plain data
parallelism over all processes of all nodes, and takes the process-group timeout in minutes so that
a config can set it (a process that dies alone then stops the others within that time).
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy

from spinlab.errors import ConfigError


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, timeout_minutes: float = 10.0, save_distributed_checkpoint: bool = True, **kwargs):
        if timeout_minutes <= 0:
            raise ConfigError(f"trainer.strategy.timeout_minutes must be > 0, got {timeout_minutes}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            timeout=timedelta(minutes=timeout_minutes),
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
