"""FSDP2 through Lightning: every process one data-parallel shard of the model.

Lightning's ModelParallelStrategy shards whatever `configure_model` asks for (PolicyModule applies
`fully_shard` per decoder layer, then on the root); this subclass fixes its mesh to plain data
parallelism over all processes of all nodes, and takes the process-group timeout in minutes so that
a config can set it (a process that dies alone then stops the others within that time). Its
distributed checkpoints are Lightning's, with the sha256 of each file computed as it is written.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from spinlab import lightning_compat
from spinlab.errors import ConfigError
from spinlab.rundir import HashingStream


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
        self.distributed_checkpoint = save_distributed_checkpoint
        # After each distributed save: (its directory, {file: sha256} of the files this process wrote).
        self.saved_digests: tuple[Path, dict[str, str]] | None = None

    def setup_environment(self) -> None:
        lightning_compat.set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Lightning's distributed save (the shards, then `meta.pt` from rank 0), each file hashed
        from the bytes on their way to disk: a checksum costs no read of the checkpoint."""
        if not self.distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        import torch.distributed.checkpoint as dcp

        path = Path(self.broadcast(filepath))
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        writer = FileSystemWriter(path)
        writer.fs = _HashingFileSystem()
        dcp.save(state, storage_writer=writer)
        digests = writer.fs.digests
        if self.global_rank == 0:
            with open(path / lightning_compat.SHARDED_META, "wb") as f:
                stream = HashingStream(f)
                torch.save(checkpoint, stream)
                f.flush()
                os.fsync(f.fileno())
            digests[lightning_compat.SHARDED_META] = stream.hexdigest()
        self.saved_digests = (path, digests)


class _HashingFileSystem(FileSystem):
    """torch.distributed.checkpoint's local file system, keeping the sha256 of every file it
    writes (by name; a renamed file keeps its digest: `.metadata.tmp` becomes `.metadata`)."""

    def __init__(self):
        super().__init__()
        self.digests: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = HashingStream(stream)
            yield hashing
        self.digests[Path(path).name] = hashing.hexdigest()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if Path(path).name in self.digests:
            self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)
