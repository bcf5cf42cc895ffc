"""Params: the schema of the whole params.yaml, every section in its place.

Imported by name (lmforge/config/__init__.py: whole_file_schema), never by a stage module: a stage
depends on the modules of the sections it reads, not on this one (tests/test_dvc_deps.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import DATASETS, Section
from lmforge.config.clean import CleanParams
from lmforge.config.data_engine import DataEngineParams
from lmforge.config.evaluate import EvaluateParams
from lmforge.config.finetune import FinetuneParams
from lmforge.config.pretrain import PretrainParams
from lmforge.config.register import RegisterParams
from lmforge.config.sft import SftParams
from lmforge.config.sources import Source
from lmforge.config.split import SplitParams
from lmforge.config.tokenize import TokenizeParams
from lmforge.config.tune import TuneParams


class Params(Section):
    seed: int = Field(1337, ge=0)
    # Processes for the data stages (null: every core). No stage lists it in dvc.yaml: the outputs
    # are the same bytes whatever it is, so changing it reruns nothing.
    workers: int | None = Field(None, ge=1)
    data_engine: DataEngineParams = Field(default_factory=lambda: DataEngineParams())
    datasets: list[Literal["corpus", "task", "chat"]] = list(DATASETS)
    sources: dict[Literal["corpus", "task", "chat"], Source]
    clean: dict[Literal["corpus", "task", "chat"], CleanParams]
    split: dict[Literal["corpus", "task", "chat"], SplitParams]
    tokenize: TokenizeParams = TokenizeParams()
    pretrain: PretrainParams = PretrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tune: TuneParams = TuneParams()
    finetune: FinetuneParams = FinetuneParams()
    sft: SftParams = SftParams()
    # "register" would shadow BaseModel.register (from ABCMeta): the attribute is register_.
    register_: RegisterParams = Field(RegisterParams(), alias="register")

    @model_validator(mode="after")
    def _base_model_reads_its_own_tokens(self) -> Params:
        # Continued pretraining needs the corpus in the base model's own tokens: a learned BPE
        # would give its embeddings other meanings.
        base = self.pretrain.init_from
        if base is not None and (self.tokenize.kind != "pretrained" or self.tokenize.model != base):
            raise ValueError(f"pretrain.init_from is {base!r}: set tokenize.kind: pretrained and tokenize.model: "
                             f"{base!r} too, so the corpus is encoded with that model's tokenizer")
        return self

    @model_validator(mode="after")
    def _sft_reads_a_chat_dataset(self) -> Params:
        name = self.sft.dataset
        if name in self.clean and self.clean[name].kind != "chat":
            raise ValueError(f"sft.dataset is {name!r}, a dataset of kind {self.clean[name].kind!r}: "
                             "chat fine-tuning reads conversations (clean.<dataset>.kind: chat)")
        return self

    @model_validator(mode="after")
    def _every_dataset_configured(self) -> Params:
        for name in self.datasets:
            for section in ("sources", "clean", "split"):
                if name not in getattr(self, section):
                    raise ValueError(f"dataset {name!r} has no entry under {section}")
        return self
