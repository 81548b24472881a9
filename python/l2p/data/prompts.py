"""Prompts for source-synthetic training data: the built-in taxonomy, a seeded composer,
user prompt files, optional expansion with a local causal LM, and a filter stage.

L2P trains on images the source model generated itself from fluent English prompts of 200-350
characters drawn from a taxonomy of 4 major classes, 17 sub-classes and over 1000 categories.
The composer walks every leaf category in a seeded order before repeating one, so any run of
N >= 1076 prompts covers the whole taxonomy; the filter (length bounds, malformed text, a
block list, exact and near duplicates) is the "auditor" stage and applies to every source of
prompts alike.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from l2p.atomic import atomic_path
from l2p.data.textfiles import read_csv, read_text

DEFAULT_MIN_CHARS = 200
DEFAULT_MAX_CHARS = 350
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.7


# --------------------------------------------------------------------------- taxonomy

@dataclass(frozen=True)
class Category:
    """One leaf of the taxonomy, with the phrases the composer may combine with it."""

    major: str
    sub: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.major} > {self.sub} > {self.name}"


@dataclass(frozen=True)
class SubClass:
    major: str
    name: str
    categories: tuple[str, ...]
    settings: tuple[str, ...]
    details: tuple[str, ...]
    styles: tuple[str, ...]
    texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Taxonomy:
    """The prompt taxonomy: major classes -> sub-classes -> leaf categories, plus the shared
    lighting and composition phrases. Load the built-in one with :func:`load_taxonomy`."""

    sub_classes: tuple[SubClass, ...]
    lighting: tuple[str, ...]
    compositions: tuple[str, ...]
    without_article: frozenset[str]

    @property
    def major_classes(self) -> list[str]:
        return list(dict.fromkeys(s.major for s in self.sub_classes))

    @property
    def categories(self) -> list[Category]:
        return [Category(s.major, s.name, c) for s in self.sub_classes for c in s.categories]

    def sub_class(self, major: str, name: str) -> SubClass:
        for s in self.sub_classes:
            if s.major == major and s.name == name:
                return s
        raise KeyError(f"no sub-class {major!r} > {name!r} in the taxonomy")


def load_taxonomy(path: str | os.PathLike | None = None) -> Taxonomy:
    """Read a taxonomy JSON file (the format of the built-in ``l2p/data/taxonomy.json``);
    ``None`` loads the built-in one."""
    if path is None:
        raw = json.loads(resources.files("l2p.data").joinpath("taxonomy.json").read_text("utf-8"))
    else:
        raw = json.loads(read_text(path))
    subs = []
    for major in raw["classes"]:
        for sub in major["sub_classes"]:
            subs.append(SubClass(
                major=major["name"], name=sub["name"], categories=tuple(sub["categories"]),
                settings=tuple(sub["settings"]), details=tuple(sub["details"]),
                styles=tuple(major["styles"]), texts=tuple(sub.get("texts", ())),
            ))
    return Taxonomy(tuple(subs), tuple(raw["lighting"]), tuple(raw["compositions"]),
                    frozenset(raw.get("without_article", ())))


# --------------------------------------------------------------------------- composer

@dataclass(frozen=True)
class PromptRecord:
    """A prompt and where it came from: a taxonomy path, "user", or "expanded"."""

    text: str
    source: str = "user"
    category: str | None = None

    def to_json(self) -> dict:
        out = {"text": self.text, "source": self.source}
        if self.category is not None:
            out["category"] = self.category
        return out


_SUBJECT = ("{Subj} {setting}.", "A detailed view of {subj} {setting}.",
            "The image shows {subj} {setting}.", "Picture {subj} {setting}.")
_COMPOSITION = ("It is framed as {x}.", "The shot uses {x}.", "The framing is {x}.")
_LIGHTING = ("The scene is lit by {x}.", "{X} falls across the scene.", "Everything is bathed in {x}.")
_DETAILS = ("Fine details include {x}.", "Close inspection reveals {x}.", "Look closely to see {x}.")
_TEXT = ('The lettering clearly reads "{x}".', 'It carries the words "{x}" in clean, legible letters.',
         'The words "{x}" stand out clearly.')
_STYLE = ("The image is {x}.", "It looks like {x}.", "The result resembles {x}.")


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


class PromptComposer:
    """Writes fluent English prompts of 3-5 sentences (subject and setting, composition,
    lighting, details or quoted text, style) within ``[min_chars, max_chars]``.

    Deterministic: the same taxonomy and ``seed`` give the same sequence. Leaf categories are
    visited in a seeded permutation, reshuffled after each full pass, so coverage is even.
    """

    def __init__(self, taxonomy: Taxonomy | None = None, *, seed: int = 0,
                 min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS):
        if min_chars > max_chars:
            raise ValueError(f"min_chars ({min_chars}) must not exceed max_chars ({max_chars})")
        self.taxonomy = taxonomy or load_taxonomy()
        self.min_chars, self.max_chars = min_chars, max_chars
        self._rng = np.random.default_rng(seed)
        self._categories = self.taxonomy.categories
        self._subs = {(s.major, s.name): s for s in self.taxonomy.sub_classes}

    def _pick(self, options):
        return options[int(self._rng.integers(len(options)))]

    def _subject(self, category: str) -> str:
        if category in self.taxonomy.without_article:
            return category
        article = "an" if re.match(r"[aeio]|u(?!ni|se|su)|hour|honest", category.lower()) else "a"
        return f"{article} {category}"

    def _sentences(self, cat: Category) -> tuple[str, list[str]]:
        sub = self._subs[(cat.major, cat.sub)]
        subj = self._subject(cat.name)
        first = self._pick(_SUBJECT).format(subj=subj, Subj=_capitalize(subj),
                                            setting=self._pick(sub.settings))
        lighting = self._pick(self.taxonomy.lighting)
        optional = [
            self._pick(_COMPOSITION).format(x=self._pick(self.taxonomy.compositions)),
            self._pick(_LIGHTING).format(x=lighting, X=_capitalize(lighting)),
            self._pick(_TEXT if sub.texts else _DETAILS).format(
                x=self._pick(sub.texts) if sub.texts else self._pick(sub.details)),
            self._pick(_STYLE).format(x=self._pick(sub.styles)),
        ]
        return first, optional

    def compose(self, category: Category) -> str:
        """One prompt about ``category``, 3-5 sentences long and within the length bounds."""
        for _ in range(64):
            first, optional = self._sentences(category)
            # Keep the reading order (subject, composition, lighting, details, style) but
            # vary which sentences appear; a text sign always keeps its quoted words.
            keep = sorted(self._rng.choice(4, size=int(self._rng.integers(2, 5)), replace=False))
            if self._subs[(category.major, category.sub)].texts and 2 not in keep:
                keep = sorted([*keep[1:], 2])
            text = " ".join([first] + [optional[i] for i in keep])
            if self.min_chars <= len(text) <= self.max_chars:
                return text
        raise ValueError(
            f"could not compose a prompt for {category.path!r} within {self.min_chars}-"
            f"{self.max_chars} characters; widen the bounds (composed prompts run 150-450)")

    def __iter__(self) -> Iterator[PromptRecord]:
        while True:
            for i in self._rng.permutation(len(self._categories)):
                cat = self._categories[int(i)]
                yield PromptRecord(self.compose(cat), source="taxonomy", category=cat.path)


# --------------------------------------------------------------------------- user prompts

def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: ``.txt`` (one per line, blank lines ignored), ``.csv`` (a ``text``
    or ``prompt`` column) or ``.jsonl`` (objects with a ``text`` or ``prompt`` key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if suffix == ".csv":
        fields, rows = read_csv(path)
        column = next((c for c in ("text", "prompt") if c in fields), None)
        if column is None:
            raise ValueError(f"{path}: a prompt CSV needs a 'text' or 'prompt' column (found {fields})")
        return [row[column].strip() for row in rows if (row[column] or "").strip()]
    if suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            text = obj if isinstance(obj, str) else next(
                (obj[k] for k in ("text", "prompt") if isinstance(obj, dict) and k in obj), None)
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: expected an object with a 'text' or 'prompt' string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                # A \ud800-style escape of half a character: no text, and nothing downstream
                # (records, metadata.csv, the manifest's hash) could write it.
                raise ValueError(f"{path}:{lineno}: the prompt holds {exc.object[exc.start]!r}, half of a "
                                 "UTF-16 pair, which is not a character; write the character itself") from None
            if text.strip():
                prompts.append(text.strip())
        return prompts
    raise ValueError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .csv or .jsonl")


def write_prompts(path: str | os.PathLike, records: Iterable[PromptRecord]) -> int:
    """Write records as JSON lines (``text``, ``source``, ``category``), atomically."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- expansion

EXPANSION_INSTRUCTION = (
    "Rewrite the image description below as one fluent English paragraph of 3 to 5 sentences "
    "(200 to 350 characters) describing the subject, setting, composition, lighting and style. "
    "Answer with the paragraph only.\n\nDescription: {prompt}\n\nParagraph:"
)


def expand_prompts(prompts: list[str], model_path: str | os.PathLike, *, seed: int = 0,
                   max_new_tokens: int = 160, temperature: float = 0.7, batch_size: int = 8,
                   device: str | None = None,
                   instruction: str = EXPANSION_INSTRUCTION) -> list[PromptRecord]:
    """Rewrite short prompts into rich ones with a local causal language model.

    ``model_path`` is a folder with a transformers causal LM and its tokenizer; it is read with
    ``local_files_only=True`` and nothing is ever downloaded. Sampling is seeded per batch.
    Run the result through :class:`PromptFilter`: a model may write anything.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(model_path)!r} is not a local transformers model folder (no config.json); "
            "pass the path of a causal LM saved with save_pretrained")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, local_files_only=True, use_safetensors=True,
        dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32).to(device).eval()
    tokenizer.padding_side = "left"  # generation continues from the right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def render(prompt: str) -> str:
        message = instruction.format(prompt=prompt)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                 tokenize=False, add_generation_prompt=True)
        return message

    out: list[PromptRecord] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        enc = tokenizer([render(p) for p in batch], return_tensors="pt", padding=True).to(device)
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
            torch.manual_seed(seed * 1_000_003 + start)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=temperature,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for row in ids[:, enc["input_ids"].shape[1]:]:
            text = " ".join(tokenizer.decode(row, skip_special_tokens=True).split())
            out.append(PromptRecord(text, source="expanded"))
    return out


# --------------------------------------------------------------------------- filter

def load_block_list(path: str | os.PathLike | None = None) -> list[str]:
    """Words or phrases (one a line, ``#`` starts a comment) that reject a prompt; ``None``
    reads the built-in ``l2p/data/blocklist.txt``."""
    if path is None:
        text = resources.files("l2p.data").joinpath("blocklist.txt").read_text("utf-8")
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"block list {str(path)!r} does not exist")
        text = read_text(path)
    words = (line.split("#", 1)[0].strip().lower() for line in text.splitlines())
    return [w for w in words if w]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


_MERSENNE = (1 << 31) - 1


@dataclass
class PromptFilter:
    """The auditor stage. ``check(text)`` returns the normalised prompt, or ``None`` and counts
    the reason in ``rejected``: ``too_short``/``too_long`` (after whitespace is collapsed),
    ``malformed`` (control characters, unbalanced quotes or brackets, no letters, a 40+ letter
    "word"), ``blocked`` (a block-list word or phrase, matched on word boundaries,
    case-insensitive), ``duplicate`` (same words) and ``near_duplicate``.

    Near duplicates: Jaccard similarity of word ``shingle_size``-grams >= ``near_duplicate_threshold``
    against any accepted prompt. MinHash signatures with LSH banding find candidates in
    constant time per prompt, and the exact Jaccard decides, so 100k prompts stay fast.
    Accepted prompts are remembered: one filter instance dedups a whole stream.
    """

    min_chars: int = DEFAULT_MIN_CHARS
    max_chars: int = DEFAULT_MAX_CHARS
    block_words: Iterable[str] = ()
    near_duplicate_threshold: float = DEFAULT_NEAR_DUPLICATE_THRESHOLD
    shingle_size: int = 3
    num_perm: int = 64
    bands: int = 16
    rejected: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.num_perm % self.bands:
            raise ValueError("num_perm must be a multiple of bands")
        words = sorted({w.strip().lower() for w in self.block_words if w.strip()})
        self._blocked = (re.compile(r"\b(?:" + "|".join(r"\s+".join(map(re.escape, w.split()))
                                                         for w in words) + r")\b")
                         if words else None)
        rng = np.random.default_rng(0x5EED)
        self._a = rng.integers(1, _MERSENNE, self.num_perm, dtype=np.int64)
        self._b = rng.integers(0, _MERSENNE, self.num_perm, dtype=np.int64)
        self._exact: set[str] = set()
        self._shingles: list[frozenset[str]] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}
        self.accepted = 0

    def _malformed(self, text: str) -> bool:
        if any(not c.isprintable() for c in text) or not re.search(r"[A-Za-z]", text):
            return True
        if text.count('"') % 2 or text.count("(") != text.count(")") or text.count("[") != text.count("]"):
            return True
        return any(len(w) >= 40 for w in text.split())

    def _signature(self, shingles: frozenset[str]) -> np.ndarray:
        x = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.int64) % _MERSENNE
        return ((self._a[:, None] * x[None, :] + self._b[:, None]) % _MERSENNE).min(axis=1)

    def check(self, text: str) -> str | None:
        text = " ".join(text.split())
        reason = None
        if len(text) < self.min_chars:
            reason = "too_short"
        elif len(text) > self.max_chars:
            reason = "too_long"
        elif self._malformed(text):
            reason = "malformed"
        elif self._blocked is not None and self._blocked.search(text.lower()):
            reason = "blocked"
        if reason is None:
            words = _words(text)
            key = " ".join(words)
            if key in self._exact:
                reason = "duplicate"
            else:
                k = self.shingle_size
                shingles = frozenset(" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1)))
                rows = self._signature(shingles).reshape(self.bands, -1)
                band_keys = [(b, rows[b].tobytes()) for b in range(self.bands)]
                candidates = {j for bk in band_keys for j in self._buckets.get(bk, ())}
                if any(len(shingles & self._shingles[j]) / len(shingles | self._shingles[j])
                       >= self.near_duplicate_threshold for j in candidates):
                    reason = "near_duplicate"
                else:
                    index = len(self._shingles)
                    self._shingles.append(shingles)
                    self._exact.add(key)
                    for bk in band_keys:
                        self._buckets.setdefault(bk, []).append(index)
        if reason is not None:
            self.rejected[reason] += 1
            return None
        self.accepted += 1
        return text

    def __call__(self, records: Iterable[PromptRecord]) -> Iterator[PromptRecord]:
        for record in records:
            text = self.check(record.text)
            if text is not None:
                yield PromptRecord(text, record.source, record.category)


def make_prompts(num: int, *, seed: int = 0, prompt_filter: PromptFilter | None = None,
                 taxonomy: Taxonomy | None = None, max_attempts_factor: int = 20) -> list[PromptRecord]:
    """``num`` composed prompts that pass ``prompt_filter`` (default: the default bounds and
    the built-in block list). Fails with a clear message if the filter rejects too many."""
    prompt_filter = prompt_filter or PromptFilter(block_words=load_block_list())
    composer = PromptComposer(taxonomy, seed=seed, min_chars=prompt_filter.min_chars,
                              max_chars=prompt_filter.max_chars)
    out: list[PromptRecord] = []
    if num <= 0:
        return out
    max_attempts = max(1000, max_attempts_factor * num)
    for attempt, record in enumerate(composer, 1):
        text = prompt_filter.check(record.text)
        if text is not None:
            out.append(PromptRecord(text, record.source, record.category))
            if len(out) == num:
                return out
        if attempt >= max_attempts:
            break
    raise ValueError(f"the filter kept only {len(out)} of {max_attempts} composed prompts "
                     f"(rejected: {dict(prompt_filter.rejected)}); lower --num or relax the filter")
