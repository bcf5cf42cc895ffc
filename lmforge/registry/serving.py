"""MLflow pyfunc wrappers that serve lmforge's transformers folders.

    mlflow models serve -m models:/lmforge-sentiment@champion --env-manager local
    curl -X POST 127.0.0.1:5000/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": ["A wonderful film.", "Dreadful."]}'
    -> {"predictions": [{"label": "positive", "probability": 0.97}, ...]}

`TextClassifier` answers a label and its probability per text; `TextGenerator` answers the
generated continuation per prompt; `ChatGenerator` answers each text as a user message, through
the model's chat template. Both load the folder logged as the artifact "model" (a plain
`save_pretrained` folder, so the registry holds exactly what the pipeline built) and check every
request before touching the model: no texts, a non-text entry, too many texts or a text that is
too long raise `MlflowException(INVALID_PARAMETER_VALUE)`, which the scoring server answers with
a 400 and the message, never a crash. A message says what is wrong (a type, a count, a length)
and never quotes the input. The caps come from the logged `model_config`; under the scoring
server, lmforge/registry/guard.py also caps the request body (`max_body_bytes`) before it is read
and keeps MLflow's own messages from quoting the request.

A request may be a plain list of texts or one text (`predict(["A fine film.", "Dreadful."])`), a
DataFrame with a `text` column (other columns are ignored), `{"text": [...]}`, or over HTTP
`{"inputs": [...]}`, `{"inputs": "one text"}`, `dataframe_split` or `dataframe_records`. The
signatures therefore declare no input schema, only outputs (and the generators' params): MLflow
enforces an input schema before `predict` sees the request, and neither column schema fits all of
these. A named `text` column makes a Python list a DataFrame with column 0 and refuses it ("Model
is missing inputs ['text']"); an unnamed column keeps only a DataFrame's first column (the `id` of
an `id, text` frame, silently) and refuses an empty list in its own words, which quote the input.
Without one, `texts_from` is the one check. Versions registered earlier keep their named `text`
signature, which MLflow enforces for them as before (DataFrames, `{"inputs": [...]}` over HTTP).

A registered model carries this module, guard.py and the two package `__init__` files
(code_paths: lmforge/registry/registration.py), so it loads where lmforge is not installed: this
module imports nothing else of lmforge, and torch and transformers only in `load_context`.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

DEFAULT_MAX_TEXTS = 64
DEFAULT_MAX_CHARS = 20_000
DEFAULT_MAX_NEW_TOKENS = 64
TEXT_COLUMN = "text"


# Bytes a request may need per character of text: JSON writes a non-ASCII character as \uXXXX.
JSON_BYTES_PER_CHAR = 6
REQUEST_OVERHEAD_BYTES = 4096  # the JSON around the texts: field names, brackets, params


def invalid(message: str) -> Exception:
    """A 400 for a bad request. The message also goes in the error's `reason` field, which the
    request guard answers with in place of the scoring server's own wording (which quotes the data)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from lmforge.registry.guard import REASON_FIELD

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE, **{REASON_FIELD: message})


def body_limit(config: dict) -> int:
    """The largest request body served: `max_body_bytes` of the model config, else room for
    max_texts texts of max_chars characters each, every one of them escaped."""
    if config.get("max_body_bytes"):
        return int(config["max_body_bytes"])
    texts = int(config.get("max_texts", DEFAULT_MAX_TEXTS))
    chars = int(config.get("max_chars", DEFAULT_MAX_CHARS))
    return texts * (chars * JSON_BYTES_PER_CHAR + 16) + REQUEST_OVERHEAD_BYTES


def texts_from(model_input: Any, max_texts: int, max_chars: int) -> list[str]:
    """The list of texts in a request, or an MlflowException saying what is wrong with it.

    Accepts a list (or tuple, array, Series) of texts, one text, a DataFrame with a `text` column
    (or a single column), a dict of one column ({"text": [...]}), a list of records
    ([{"text": ...}, ...]), and what MLflow makes of these: under a signature with no input schema
    the scoring server hands over an array for {"inputs": [...]} (0-d for {"inputs": "a text"}) and
    a DataFrame for dataframe_split/records; under the named `text` schema of earlier versions, a
    DataFrame with a `text` column (one row holding the whole list, for a Python {"text": [...]}).
    """
    import numpy as np
    import pandas as pd

    data = model_input
    if isinstance(data, dict):
        if TEXT_COLUMN in data:
            data = data[TEXT_COLUMN]
        elif "inputs" in data:
            data = data["inputs"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise invalid(f"expected a `{TEXT_COLUMN}` field, got {len(data)} other fields")
    if isinstance(data, np.ndarray) and data.ndim == 0:
        data = data.item()  # the scoring server's array for {"inputs": "a text"}
    if isinstance(data, (list, tuple)) and data and all(isinstance(row, dict) for row in data):
        data = pd.DataFrame(list(data))  # records: [{"text": ...}, ...]
    if isinstance(data, pd.DataFrame):
        if TEXT_COLUMN in data.columns:
            data = data[TEXT_COLUMN]
        elif data.shape[1] == 1:
            data = data.iloc[:, 0]
        else:
            raise invalid(f"expected a `{TEXT_COLUMN}` column, got {data.shape[1]} other columns")
    if isinstance(data, (str, np.str_)):
        data = [data]
    if isinstance(data, (pd.Series, np.ndarray)):
        data = data.tolist()
    if not isinstance(data, (list, tuple)):
        raise invalid(f"expected a list of texts, got {type(data).__name__}")
    # the scoring server makes each value of {"inputs": [{"text": "a text"}, ...]} a 0-d array
    data = [item.item() if isinstance(item, np.ndarray) and item.ndim == 0 else item for item in data]
    if len(data) == 1 and isinstance(data[0], (list, tuple, np.ndarray)):
        # pyfunc turns a Python {"text": [...]} into one row holding the whole list
        data = list(data[0])
    if not data:
        raise invalid("the request holds no texts")
    if len(data) > max_texts:
        raise invalid(f"the request holds {len(data)} texts; the limit is {max_texts} a request")
    texts = []
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise invalid(f"text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise invalid(f"text {i} is empty")
        if len(text) > max_chars:
            raise invalid(f"text {i} has {len(text)} characters; the limit is {max_chars}")
        texts.append(str(text))
    return texts


class _Base(mlflow.pyfunc.PythonModel):
    def _caps(self, context) -> tuple[int, int]:
        config = getattr(context, "model_config", None) or {}
        return int(config.get("max_texts", DEFAULT_MAX_TEXTS)), int(config.get("max_chars", DEFAULT_MAX_CHARS))

    def _setup(self, context) -> None:
        import torch

        from lmforge.registry import guard

        self.max_texts, self.max_chars = self._caps(context)
        self.config = dict(getattr(context, "model_config", None) or {})
        guard.install_when_served(body_limit(self.config))
        self.folder = context.artifacts["model"]
        self.torch = torch


class TextClassifier(_Base):
    """A transformers sequence classifier: text -> label and its probability."""

    def load_context(self, context) -> None:
        import inspect

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._setup(context)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.folder).eval()
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # decoder classifiers (Llama) ship without one
        if getattr(self.model.config, "pad_token_id", None) is None and self.tokenizer.pad_token_id is not None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id  # they find each row's last token by it
        labels = self.model.config.id2label or {}
        self.labels = {int(k): str(v) for k, v in labels.items()}
        limit = self.config.get("max_length") or getattr(self.tokenizer, "model_max_length", 512)
        positions = getattr(self.model.config, "max_position_embeddings", None) or limit
        self.max_length = int(min(limit, positions, 1_000_000))
        self.batch_size = int(self.config.get("batch_size", 16))
        forward = inspect.signature(self.model.forward).parameters.values()
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in forward)
        self.forward_args = None if open_ended else {p.name for p in forward}

    def predict(self, context, model_input, params=None):
        import pandas as pd

        texts = texts_from(model_input, self.max_texts, self.max_chars)
        labels, probabilities = [], []
        with self.torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start : start + self.batch_size], truncation=True,
                                       max_length=self.max_length, padding=True, return_tensors="pt")
                inputs = {k: v for k, v in batch.items() if self.forward_args is None or k in self.forward_args}
                probs = self.torch.softmax(self.model(**inputs).logits.float(), dim=-1)
                best = probs.max(dim=-1)
                for index, prob in zip(best.indices.tolist(), best.values.tolist()):
                    labels.append(self.labels.get(index, str(index)))
                    probabilities.append(round(float(prob), 6))
        return pd.DataFrame({"label": labels, "probability": probabilities})


class TextGenerator(_Base):
    """A transformers causal LM: prompt -> generated continuation (the prompt not repeated)."""

    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._setup(context)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModelForCausalLM.from_pretrained(self.folder).eval()
        self.max_new_tokens = int(self.config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        texts = texts_from(model_input, self.max_texts, self.max_chars)
        params = dict(params or {})
        asked = params.get("max_new_tokens")  # 0 is a request for nothing, not for the default
        new_tokens = self.max_new_tokens if asked is None else int(asked)
        if not 1 <= new_tokens <= self.max_new_tokens:
            raise invalid(f"max_new_tokens must be between 1 and {self.max_new_tokens}")
        temperature = float(params.get("temperature") or 0.0)
        if not 0.0 <= temperature <= 10.0:
            raise invalid("temperature must be between 0 and 10")
        seed = params.get("seed")
        outputs = []
        context_len = getattr(self.model.config, "max_position_embeddings", None)
        with self.torch.inference_mode():
            for text in texts:  # one prompt at a time: no padding side to get wrong, caps keep it small
                if seed is None:
                    self.torch.seed()  # unseeded: fresh randomness for every prompt
                else:
                    self.torch.manual_seed(int(seed))  # seeded: the same answer every time
                ids = self._prompt_ids(text)
                if context_len:
                    ids = ids[:, -max(1, context_len - new_tokens):]
                if ids.shape[1] == 0:
                    raise invalid("a prompt encodes to no tokens")
                sampling = {"do_sample": True, "temperature": temperature, "top_k": 50} if temperature > 0 else {"do_sample": False}
                out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                          pad_token_id=self._pad_id(), **sampling)
                outputs.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return pd.DataFrame({"generated_text": outputs})

    def _prompt_ids(self, text: str):
        return self.tokenizer(text, return_tensors="pt")["input_ids"]

    def _pad_id(self) -> int | None:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.model.config.eos_token_id):
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0


class ChatGenerator(TextGenerator):
    """A chat model: each text is one user message, answered through the tokenizer's chat
    template (the reply alone, without the template's markers)."""

    def _prompt_ids(self, text: str):
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        # the template writes any special tokens itself
        return self.tokenizer(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]


def classifier_signature():
    """Outputs only: no input schema, so a list of texts reaches `predict` as it is (module docstring)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))


def generator_signature(max_new_tokens: int):
    """Outputs and params only: no input schema, so a list of prompts reaches `predict` as it is."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([
        ParamSpec("max_new_tokens", "long", int(max_new_tokens)),
        ParamSpec("temperature", "double", 0.0),
        ParamSpec("seed", "long", None),  # None: each request samples afresh
    ])
    return ModelSignature(outputs=Schema([ColSpec("string", "generated_text")]), params=params)
