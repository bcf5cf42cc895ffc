"""The `data_engine` section: where the data stages run their shards (lmforge/data/engine.py)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import Section

# A value written into a shell script unquoted: no space, quote, $, `, ;, |, &, <, >, newline.
_SHELL_WORD = r"^[A-Za-z0-9_.,:=/@%+-]+$"


class DataEngineParams(Section):
    """Where clean, split and tokenize run their shards (lmforge/data/engine.py): datatrove's local
    process pool, or its Slurm executor (one array job per step, paths on a shared filesystem)."""

    class Slurm(Section):
        """datatrove writes these into the sbatch script as they are (`source <venv_path>/...`,
        `#SBATCH --<key>=<value>`), and a shell runs it: every value is held to characters that
        no shell reads as syntax, so no value (a flow's -S override included) can run commands."""

        partition: str | None = Field(None, pattern=_SHELL_WORD)
        time: str = Field("4:00:00", pattern=r"^[0-9:-]+$")  # each array task's time limit
        cpus_per_task: int = Field(1, ge=1)
        mem_per_cpu_gb: int = Field(4, ge=1)
        # Shards one array task runs one after another. Each task pays a process start-up (about
        # 3 s: srun, then importing datatrove and the step's code), so many small shards run
        # faster several to a task: 48 shards took 129 s at 1 and 19 s at 8 on a two-node test
        # cluster. A rank's completion mark is its own either way, so a rerun redoes no shard.
        tasks_per_job: int = Field(1, ge=1)
        qos: str = Field("normal", pattern=_SHELL_WORD)
        venv_path: str | None = Field(None, pattern=r"^/[A-Za-z0-9_./+-]*$")  # absolute: the environment each node activates
        sbatch_args: dict[str, str] = Field(default_factory=dict)

        @field_validator("sbatch_args")
        @classmethod
        def _plain_sbatch_args(cls, args: dict[str, str]) -> dict[str, str]:
            for key, value in args.items():
                if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                    raise ValueError(f"{key!r} is no sbatch option name (lowercase letters, digits and -)")
                if not re.fullmatch(_SHELL_WORD, value):
                    raise ValueError(f"the value of {key!r} may hold only letters, digits and _.,:=/@%+- "
                                     "(it is written into a shell script)")
            return args

    executor: Literal["local", "slurm"] = "local"
    slurm: Slurm = Field(default_factory=lambda: DataEngineParams.Slurm())

    @model_validator(mode="after")
    def _slurm_needs_a_partition(self) -> DataEngineParams:
        if self.executor == "slurm" and not self.slurm.partition:
            raise ValueError("executor slurm needs slurm.partition")
        return self
