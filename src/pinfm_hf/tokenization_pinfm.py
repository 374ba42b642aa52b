"""Tokenizer of user activity events: item, action and surface vocabularies with hash buckets for fresh items."""

import collections.abc
import hashlib
import json
import numbers
import os
import re
import zlib
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.utils import PaddingStrategy, logging

from .io_utils import atomic_write, atomic_write_json


try:  # bulk Arrow encoding needs pyarrow; loading the tokenizer and encoding single histories do not
    import pyarrow as pa
    import pyarrow.compute as pc
except ImportError:
    pa = pc = None

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "pinfm_vocab.json", "items_file": "pinfm_items.arrow"}
# Above this many known items, they are kept in an Arrow array with a sorted key index ([`VocabularyIndex`]) and saved to
# `pinfm_items.arrow` rather than as a JSON list and a Python dict (10^7 items: ~1.1 GB of dict, seconds to build).
LARGE_VOCABULARY = 100_000

def item_keys(item_ids: Sequence[str]) -> np.ndarray:
    """64-bit keys of item ids (BLAKE2b): stable across processes and machines, collisions ~n^2 / 2^65."""
    digests = b"".join(hashlib.blake2b(item.encode("utf-8"), digest_size=8).digest() for item in item_ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


class VocabularyIndex:
    """
    The known items of a large vocabulary without a Python dict: the ids in an Arrow string array (token order) and
    their 64-bit keys ([`item_keys`]) sorted, with each key's position. A lookup is a binary search, confirmed by
    comparing the stored id, so a key collision with an unknown id is never a wrong hit. Needs pyarrow.
    """

    def __init__(self, items: Any, keys: Optional[np.ndarray] = None, order: Optional[np.ndarray] = None):
        _require_pyarrow()
        self.items = pa.array(items, type=pa.string()) if not isinstance(items, pa.Array) else items.cast(pa.string())
        keys = item_keys(self.items.to_pylist()) if keys is None else np.asarray(keys, dtype=np.uint64)
        self.order = np.argsort(keys, kind="stable") if order is None else np.asarray(order, dtype=np.int64)
        self.sorted_keys = keys[self.order]
        repeated = np.flatnonzero(self.sorted_keys[1:] == self.sorted_keys[:-1])
        if len(repeated):
            a, b = (self.items[int(self.order[i])].as_py() for i in (repeated[0], repeated[0] + 1))
            if a == b:
                raise ValueError(f"Item ids must be unique: {a!r} appears twice.")
            raise ValueError(f"Item ids {a!r} and {b!r} share a 64-bit key: rename one (a 1-in-10^19 event).")

    def __len__(self) -> int:
        return len(self.items)

    def positions(self, item_ids: Sequence[str]) -> np.ndarray:
        """The position of each id among the items, -1 where it is not one."""
        if not len(self.items) or not len(item_ids):
            return np.full(len(item_ids), -1, dtype=np.int64)
        keys = item_keys(item_ids)
        slots = np.searchsorted(self.sorted_keys, keys).clip(max=len(self.sorted_keys) - 1)
        positions = np.where(self.sorted_keys[slots] == keys, self.order[slots], -1)
        hit = np.flatnonzero(positions >= 0)
        stored = pc.take(self.items, pa.array(positions[hit]))
        same = pc.equal(stored, pa.array([item_ids[i] for i in hit], type=pa.string())).to_numpy(zero_copy_only=False)
        positions[hit[~same]] = -1
        return positions

    def save(self, path: str) -> None:
        """An Arrow IPC file of the items, their keys and the key order, read back memory-mapped by [`VocabularyIndex.load`]."""
        table = pa.table({"item_id": self.items, "key": self.sorted_keys[np.argsort(self.order)], "order": self.order})

        def write(tmp: str) -> None:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str) -> "VocabularyIndex":
        _require_pyarrow()
        try:
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"Item file {path} is not a readable Arrow file (truncated or corrupt?): {e}.") from None
        if table.column_names != ["item_id", "key", "order"]:
            raise ValueError(f"Item file {path} has columns {table.column_names}, expected ['item_id', 'key', 'order'].")
        column = table.column("item_id").combine_chunks()
        keys, order = (table.column(name).to_numpy() for name in ("key", "order"))
        return cls(column, keys=keys, order=order)


# Item ids 0..3 are reserved; raw item ids are never used as token ids.
SPECIAL_ITEM_TOKENS = ("<pad>", "<unk>", "<mask>", "<cand>")
PAD_ID, UNK_ID, MASK_ID, CANDIDATE_ITEM_ID = 0, 1, 2, 3
# Action ids: 0 pads, 1 marks an appended candidate (early fusion); real actions follow.
SPECIAL_ACTION_TOKENS = ("<pad>", "<cand>")
CANDIDATE_ACTION_ID = 1
SPECIAL_SURFACE_TOKENS = ("<pad>", "<unk>")
# Entries of the vocabulary file and what each must hold.
_VOCAB_FILE_KEYS = ("items", "actions", "surfaces", "num_hash_buckets")
# Per-event keys that `pad` pads along with `input_ids` (as `PinFMDataCollator` does), and their padding values.
EVENT_PAD_VALUES = {"action_ids": 0, "surface_ids": 0, "timestamps": 0, "labels": -100}
_INTEGER = re.compile(r"^[+-]?\d+$")
_BUCKET = re.compile(r"<bucket_(\d+)>")


def stable_bucket(item_id: str, num_buckets: int) -> int:
    """Bucket of an unseen item id: crc32 is stable across processes and machines (unlike `hash()`)."""
    return zlib.crc32(item_id.encode("utf-8")) % num_buckets


def _read_vocab_file(vocab_file: str) -> dict[str, Any]:
    """The vocabularies saved by `save_vocabulary`, checked: a truncated or hand-edited file fails here, naming it."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Vocabulary file {vocab_file} is not valid JSON (truncated or corrupt?): {e}.") from None
    if not isinstance(vocab, dict):
        kind = type(vocab).__name__
        raise ValueError(f"Vocabulary file {vocab_file} holds a {kind}, not a dict with {list(_VOCAB_FILE_KEYS)}.")
    missing = [key for key in _VOCAB_FILE_KEYS if key not in vocab]
    if missing:
        raise ValueError(f"Vocabulary file {vocab_file} has no `{missing[0]}` entry; it needs {list(_VOCAB_FILE_KEYS)}.")
    for key in ("items", "actions", "surfaces"):
        values = vocab[key]
        if not isinstance(values, list) or not all(type(v) is str for v in values):
            raise ValueError(f"Vocabulary file {vocab_file}: `{key}` must be a list of strings.")
    buckets = vocab["num_hash_buckets"]
    if isinstance(buckets, bool) or not isinstance(buckets, int):
        raise ValueError(f"Vocabulary file {vocab_file}: `num_hash_buckets` must be an integer, got {buckets!r}.")
    return vocab


def check_tokenizer_matches_model(tokenizer: Any, config: Any) -> None:
    """
    Raise `ValueError` when `tokenizer`'s vocabularies do not fit the tables of the model configured by `config`:
    item token ids index the item table row for row (`len(tokenizer)` must equal `config.item_vocab_size`, or the
    model scores other items than the tokenizer names), and action/surface ids must exist in their tables.
    """
    if len(tokenizer) != config.item_vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} item tokens but the model's item table has {config.item_vocab_size} "
            "(`config.item_vocab_size`): load the tokenizer saved with this model."
        )
    if tokenizer.action_vocab_size > config.action_vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.action_vocab_size} action tokens but the model's action table has "
            f"{config.action_vocab_size} (`config.action_vocab_size`): load the tokenizer saved with this model."
        )
    if config.surface_vocab_size > 0 and tokenizer.surface_vocab_size > config.surface_vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.surface_vocab_size} surface tokens but the model's surface table has "
            f"{config.surface_vocab_size} (`config.surface_vocab_size`): load the tokenizer saved with this model."
        )


def _require_pyarrow() -> None:
    if pa is None:
        raise ImportError("Bulk encoding of Arrow tables needs pyarrow: `pip install pyarrow`.")


def _as_arrow_table(sequences: Any) -> Any:
    """A `pyarrow.Table` view of a table or a `datasets.Dataset` (honouring `select`/`shuffle` indices)."""
    if hasattr(sequences, "with_format"):
        return sequences.with_format("arrow")[:]
    return sequences


class _ItemTokens(collections.abc.Sequence):
    """`item_tokens` of a large vocabulary: the special tokens, then the items of an [`VocabularyIndex`], read on demand."""

    def __init__(self, index: VocabularyIndex):
        self.index = index

    def __len__(self) -> int:
        return len(SPECIAL_ITEM_TOKENS) + len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, and IndexError past the end
        return SPECIAL_ITEM_TOKENS[i] if i < len(SPECIAL_ITEM_TOKENS) else self.index.items[i - len(SPECIAL_ITEM_TOKENS)].as_py()


class _Vocabulary(collections.abc.Mapping):
    """[`PinFMTokenizer.get_vocab`]: the special, item and bucket tokens with their ids, looked up on demand."""

    def __init__(self, tokenizer: "PinFMTokenizer"):
        self.tokenizer = tokenizer

    def __getitem__(self, token: str) -> int:
        token_id = self.tokenizer._exact_token_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise KeyError(token)
        return token_id

    def __iter__(self):
        yield from self.tokenizer.item_tokens
        yield from (f"<bucket_{k}>" for k in range(self.tokenizer.num_hash_buckets))

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    def copy(self) -> "_Vocabulary":
        return self  # read-only


class PinFMTokenizer(PreTrainedTokenizer):
    """
    Maps events (item id, action, optional surface, timestamp) to model inputs.

    Item token ids: 4 special tokens (`<pad>`, `<unk>`, `<mask>`, `<cand>`), then the known items by descending
    count, then `num_hash_buckets` buckets (`<bucket_k>`) that unseen item ids are hashed into, so a fresh item gets
    a deterministic token of its own instead of one shared unknown. Actions and surfaces have their own small
    vocabularies. Build one with [`PinFMTokenizer.from_events`]; encode a single history with
    [`~PinFMTokenizer.encode_events`] or whole Arrow tables of sequences with [`~PinFMTokenizer.encode_sequences`].

    Args:
        vocab_file (`str`, *optional*):
            JSON file written by `save_pretrained` with the item, action and surface vocabularies.
        items_file (`str`, *optional*):
            `pinfm_items.arrow`, written beside `vocab_file` for vocabularies of more than `LARGE_VOCABULARY` items.
        items (`Sequence[str]` or `pyarrow.Array`, *optional*):
            Known item ids in token order (used when `vocab_file` is not given). More than `LARGE_VOCABULARY` of them
            are kept in an [`VocabularyIndex`] (an Arrow array and sorted 64-bit keys) instead of a Python dict.
        actions (`Sequence[str]`, *optional*):
            Action names.
        surfaces (`Sequence[str]`, *optional*):
            Surface names; empty when the data has none.
        num_hash_buckets (`int`, *optional*, defaults to 1024):
            Number of buckets for item ids not in the vocabulary; 0 maps them all to `<unk>`.
        model_max_length (`int`, *optional*, defaults to 200):
            Number of most recent events kept per user.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    truncation_side = "left"

    def __init__(
        self,
        vocab_file: Optional[str] = None,
        items_file: Optional[str] = None,
        items: Optional[Sequence[str]] = None,
        actions: Optional[Sequence[str]] = None,
        surfaces: Optional[Sequence[str]] = None,
        num_hash_buckets: int = 1024,
        model_max_length: int = 200,
        **kwargs,
    ):
        index = None
        if vocab_file is not None:
            vocab = _read_vocab_file(vocab_file)
            items, actions, surfaces = vocab["items"], vocab["actions"], vocab["surfaces"]
            num_hash_buckets = vocab["num_hash_buckets"]
            if vocab.get("items_file"):
                if items_file is None:
                    raise ValueError(f"{vocab_file} keeps its items in {vocab['items_file']}, which is not beside it.")
                index = VocabularyIndex.load(items_file)
        elif items is not None and len(items) > LARGE_VOCABULARY and pa is not None:
            index = VocabularyIndex(items)
        items = [] if index is not None else list(items or [])
        actions, surfaces = list(actions or []), list(surfaces or [])
        if num_hash_buckets < 0:
            raise ValueError(f"`num_hash_buckets` ({num_hash_buckets}) must be >= 0.")
        self.num_hash_buckets = num_hash_buckets
        self._index = index
        # The special tokens and the known items; the buckets' tokens (`<bucket_k>`) are implied, not stored, so that a
        # vocabulary-free tokenizer (no items, millions of buckets) stays small.
        if index is None:
            clashes = sorted(set(items) & set(SPECIAL_ITEM_TOKENS))
            self.item_tokens = list(SPECIAL_ITEM_TOKENS) + items
            self.item_to_id = {token: i for i, token in enumerate(self.item_tokens)}
            unique = len(self.item_to_id) == len(self.item_tokens) and not any(map(_BUCKET.fullmatch, items))
        else:
            clashes = sorted(set(SPECIAL_ITEM_TOKENS) & set(pc.unique(pc.filter(index.items, pc.match_substring_regex(
                index.items, "^<.*>$"))).to_pylist()))
            self.item_tokens = _ItemTokens(index)
            self.item_to_id = {token: i for i, token in enumerate(SPECIAL_ITEM_TOKENS)}  # the items are in the index
            unique = not pc.any(pc.match_substring_regex(index.items, "^<bucket_[0-9]+>$")).as_py()
        if clashes:
            raise ValueError(f"Item ids {clashes} clash with special tokens {SPECIAL_ITEM_TOKENS}.")
        if not unique:
            raise ValueError("Item ids must be unique and must not look like hash buckets (`<bucket_k>`).")
        self.first_bucket_id = len(self.item_tokens)
        self.action_tokens = list(SPECIAL_ACTION_TOKENS) + actions
        self.action_to_id = {a: i for i, a in enumerate(self.action_tokens)}
        self.surface_tokens = list(SPECIAL_SURFACE_TOKENS) + surfaces if surfaces else []
        self.surface_to_id = {s: i for i, s in enumerate(self.surface_tokens)}
        self._item_array = None  # pyarrow lookup array, built on first bulk encode
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("mask_token", "<mask>")
        super().__init__(model_max_length=model_max_length, num_hash_buckets=num_hash_buckets, **kwargs)

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs):
        # Without the vocabulary file `__init__` would build a tokenizer of special tokens and buckets only, which
        # maps every item to a bucket and knows no action: refuse instead (building one directly stays allowed).
        if resolved_vocab_files.get("vocab_file") is None:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no `{VOCAB_FILES_NAMES['vocab_file']}`: save the tokenizer there "
                "with `tokenizer.save_pretrained(folder)`."
            )
        return super()._from_pretrained(resolved_vocab_files, pretrained_model_name_or_path, *args, **kwargs)

    # ----- building -----------------------------------------------------------------------------------------------

    @classmethod
    def from_events(
        cls,
        events: Any,
        *,
        min_count: int = 1,
        max_vocab_size: Optional[int] = None,
        num_hash_buckets: int = 1024,
        model_max_length: int = 200,
        **kwargs,
    ) -> "PinFMTokenizer":
        """
        Build the vocabularies from an event table (a `pyarrow.Table` or anything with a `.table` attribute holding
        one, with columns `item_id`, `action` and optionally `surface`). Items seen fewer than `min_count` times, or
        beyond the `max_vocab_size` most frequent, are left to the hash buckets. Ties in count break by item id, so the
        result is deterministic.
        """
        _require_pyarrow()

        table = getattr(events, "table", events)
        counts = pc.value_counts(table.column("item_id"))
        return cls.from_item_counts(
            counts.field("values"), counts.field("counts"), actions=pc.unique(table.column("action")).to_pylist(),
            surfaces=pc.unique(table.column("surface")).to_pylist() if "surface" in table.column_names else (),
            min_count=min_count, max_vocab_size=max_vocab_size, num_hash_buckets=num_hash_buckets,
            model_max_length=model_max_length, **kwargs,
        )

    @classmethod
    def from_item_counts(
        cls,
        item_ids: Any,
        counts: Any,
        *,
        actions: Sequence[str],
        surfaces: Sequence[str] = (),
        min_count: int = 1,
        max_vocab_size: Optional[int] = None,
        num_hash_buckets: int = 1024,
        model_max_length: int = 200,
        **kwargs,
    ) -> "PinFMTokenizer":
        """
        Build the vocabularies from item event counts (what an engine computed over a log too large to load: see
        `pinfm_hf.data.prepare_events`), the action names and the surface names. Same rules as `from_events`: most
        frequent first, ties by item id; items below `min_count` or past `max_vocab_size` go to the hash buckets.
        """
        _require_pyarrow()
        if min_count < 1:
            raise ValueError(f"`min_count` ({min_count}) must be >= 1.")
        ranked = pa.table({"item": pa.array(item_ids, pa.string()), "count": pa.array(counts, pa.int64())})
        num_items = ranked.num_rows
        ranked = ranked.filter(pc.greater_equal(ranked["count"], min_count))
        ranked = ranked.take(pc.sort_indices(ranked, sort_keys=[("count", "descending"), ("item", "ascending")]))
        if max_vocab_size is not None:
            ranked = ranked.slice(0, max_vocab_size)
        items = ranked["item"].combine_chunks() if ranked.num_rows > LARGE_VOCABULARY else ranked["item"].to_pylist()
        actions, surfaces = sorted(actions), sorted(surfaces)
        logger.info(
            "Built item vocabulary: %d items kept of %d (min_count=%d, max_vocab_size=%s), %d hash buckets, %d actions.",
            len(items), num_items, min_count, max_vocab_size, num_hash_buckets, len(actions),
        )
        return cls(
            items=items, actions=actions, surfaces=surfaces, num_hash_buckets=num_hash_buckets,
            model_max_length=model_max_length, **kwargs,
        )

    # ----- vocabulary -----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.item_tokens) + self.num_hash_buckets

    @property
    def num_items(self) -> int:
        """Number of known (non-special, non-bucket) items."""
        return self.first_bucket_id - len(SPECIAL_ITEM_TOKENS)

    @property
    def action_vocab_size(self) -> int:
        return len(self.action_tokens)

    @property
    def surface_vocab_size(self) -> int:
        return len(self.surface_tokens)

    @property
    def candidate_action_id(self) -> int:
        return CANDIDATE_ACTION_ID

    def get_vocab(self) -> "_Vocabulary":
        """Token -> id of every item token, as a read-only mapping: a dict of millions of items would take seconds and
        gigabytes, and transformers asks for it at every construction."""
        return _Vocabulary(self)

    def _exact_token_id(self, token: str) -> Optional[int]:
        """The id of a token of the vocabulary (special, item or `<bucket_k>`), None for any other string."""
        token_id = self.item_to_id.get(token)
        if token_id is None and self._index is not None:
            position = int(self._index.positions([token])[0])
            token_id = len(SPECIAL_ITEM_TOKENS) + position if position >= 0 else None
        bucket = _BUCKET.fullmatch(token) if token_id is None else None
        if bucket and int(bucket.group(1)) < self.num_hash_buckets:
            token_id = self.first_bucket_id + int(bucket.group(1))
        return token_id

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # A plain string is one item id (ids may contain spaces, e.g. movie titles); pass lists for sequences.
        return [text]

    def _convert_token_to_id(self, token: str) -> int:
        token_id = self._exact_token_id(token)
        if token_id is not None:
            return token_id
        if self.num_hash_buckets == 0:
            return UNK_ID
        return self.first_bucket_id + stable_bucket(token, self.num_hash_buckets)

    def _convert_id_to_token(self, index: int) -> str:
        if index >= self.first_bucket_id:
            return f"<bucket_{index - self.first_bucket_id}>"
        return self.item_tokens[index]

    def convert_actions_to_ids(self, actions: Iterable[str]) -> list[int]:
        """Action names to ids; an unknown action is an error, not a silent `<pad>`."""
        ids = []
        for action in actions:
            if action not in self.action_to_id:
                raise ValueError(f"Unknown action {action!r}; this tokenizer knows {self.action_tokens[2:]}.")
            ids.append(self.action_to_id[action])
        return ids

    def convert_surfaces_to_ids(self, surfaces: Iterable[str]) -> list[int]:
        return [self.surface_to_id.get(s, 1) for s in surfaces]

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary directory {save_directory!r} does not exist.")
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"])
        n_special = len(SPECIAL_ITEM_TOKENS)
        vocab = {
            "items": self.item_tokens[n_special : self.first_bucket_id] if self._index is None else [],
            "actions": self.action_tokens[len(SPECIAL_ACTION_TOKENS) :],
            "surfaces": self.surface_tokens[len(SPECIAL_SURFACE_TOKENS) :],
            "num_hash_buckets": self.num_hash_buckets,
        }
        if self._index is None:
            atomic_write_json(path, vocab, indent=None)  # the file's mode follows the umask, like the other files
            return (path,)
        items_path = os.path.join(os.path.dirname(path), os.path.basename(path).replace(
            VOCAB_FILES_NAMES["vocab_file"], VOCAB_FILES_NAMES["items_file"]))
        self._index.save(items_path)  # first: a JSON naming a missing file would not load
        atomic_write_json(path, {**vocab, "items_file": os.path.basename(items_path)}, indent=None)
        return (path, items_path)

    # ----- encoding ---------------------------------------------------------------------------------------------------

    def encode_events(
        self,
        item_ids: Sequence[Any],
        actions: Optional[Sequence[str]] = None,
        timestamps: Optional[Sequence[Any]] = None,
        surfaces: Optional[Sequence[str]] = None,
        max_length: Optional[int] = None,
        return_tensors: Optional[str] = None,
    ) -> BatchEncoding:
        """
        Encode one user's time-ordered history (oldest event first), keeping its `max_length` most recent events.

        Item ids are strings or integers (an integer is its decimal string, as in the recommendation pipeline);
        timestamps are integer unix seconds (or strings of one) and must not decrease. An empty history encodes to
        empty lists (a CTR row then appends its candidate), but `return_tensors` refuses it: a model needs at least
        one event per row.
        """
        if isinstance(item_ids, (str, bytes)):
            raise TypeError(f"`item_ids` must be a list of item ids, not one {type(item_ids).__name__} ({item_ids!r}).")
        if max_length is None:
            max_length = self.model_max_length
        elif isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
            raise ValueError(f"`max_length` must be a positive integer, got {max_length!r}.")
        n = len(item_ids)
        if n == 0 and return_tensors is not None:
            raise ValueError("`item_ids` is empty: the model needs at least one event per history.")
        for name, values in (("actions", actions), ("timestamps", timestamps), ("surfaces", surfaces)):
            if values is not None and len(values) != n:
                raise ValueError(f"`{name}` has {len(values)} entries but `item_ids` has {n}.")
        start = max(n - max_length, 0)
        encoded = {"input_ids": [self._convert_token_to_id(item) for item in self._item_strings(item_ids, start)]}
        if actions is not None:
            encoded["action_ids"] = self.convert_actions_to_ids(actions[start:])
        if surfaces is not None and self.surface_tokens:
            encoded["surface_ids"] = self.convert_surfaces_to_ids(surfaces[start:])
        if timestamps is not None:
            encoded["timestamps"] = self._checked_timestamps(timestamps, start)
        encoded["attention_mask"] = [1] * len(encoded["input_ids"])
        if return_tensors is not None:
            encoded = {k: [v] for k, v in encoded.items()}
        return BatchEncoding(encoded, tensor_type=return_tensors)

    @staticmethod
    def _item_strings(item_ids: Sequence[Any], start: int) -> list[str]:
        """`item_ids[start:]` as strings: integers (not bools) become their decimal string, anything else is refused."""
        items = []
        for i in range(start, len(item_ids)):
            item = item_ids[i]
            if isinstance(item, str):
                items.append(item)
            elif isinstance(item, numbers.Integral) and not isinstance(item, (bool, np.bool_)):
                items.append(str(int(item)))
            else:
                raise TypeError(f"`item_ids[{i}]` must be a string or an integer item id, got {item!r}.")
        return items

    @staticmethod
    def _checked_timestamps(timestamps: Sequence[Any], start: int) -> list[int]:
        """`timestamps[start:]` as ints (integers or integer strings), checked to be non-decreasing."""
        values = []
        for i in range(start, len(timestamps)):
            t = timestamps[i]
            if isinstance(t, str) and _INTEGER.match(t.strip()):
                t = int(t)
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
                raise TypeError(f"`timestamps[{i}]` must be an integer (unix seconds), got {t!r}.")
            t = int(t)
            if values and t < values[-1]:
                raise ValueError(
                    f"`timestamps[{i}]` ({t}) is before `timestamps[{i - 1}]` ({values[-1]}): events go oldest first."
                )
            values.append(t)
        return values

    def _pad(
        self,
        encoded_inputs: dict[str, Any],
        max_length: Optional[int] = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
    ) -> dict:
        """
        Pad one example as the base class does, and its per-event keys (`action_ids`, `surface_ids`, `timestamps`
        with 0, `labels` with -100) with it, as `PinFMDataCollator` does. With `padding="max_length"`, a longer example
        keeps its `max_length` most recent events (the collator's truncation) instead of staying ragged.
        """
        n = len(encoded_inputs[self.model_input_names[0]])
        event_keys = [k for k, v in encoded_inputs.items() if k in EVENT_PAD_VALUES and isinstance(v, (list, tuple))]
        for key in event_keys:
            if len(encoded_inputs[key]) != n:
                raise ValueError(f"`{key}` has {len(encoded_inputs[key])} values but `input_ids` has {n}.")
        if padding_strategy == PaddingStrategy.MAX_LENGTH and max_length is not None and n > max_length:
            for key in [*event_keys, self.model_input_names[0], "attention_mask"]:
                if key in encoded_inputs:
                    encoded_inputs[key] = list(encoded_inputs[key])[n - max_length :]
            n = max_length
        padded = super()._pad(
            encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side, return_attention_mask
        )
        difference = len(padded[self.model_input_names[0]]) - n
        if difference > 0:
            side = padding_side if padding_side is not None else self.padding_side
            for key in event_keys:
                padding = [EVENT_PAD_VALUES[key]] * difference
                values = list(padded[key])
                padded[key] = values + padding if side == "right" else padding + values
        return padded

    def item_ids_to_token_ids(self, item_ids: Any) -> np.ndarray:
        """Vectorised lookup of many raw item ids (a pyarrow array or a list of str): unseen ids go to their bucket."""
        _require_pyarrow()

        values = item_ids if isinstance(item_ids, (pa.Array, pa.ChunkedArray)) else pa.array(item_ids, type=pa.string())
        if self._index is not None:  # each distinct id looked up once, by binary search
            distinct = pc.unique(values)
            names = distinct.to_pylist()
            positions = self._index.positions(names)
            ids = np.where(positions >= 0, positions + len(SPECIAL_ITEM_TOKENS), 0)
            for j in np.flatnonzero(positions < 0):
                ids[j] = self._convert_token_to_id(names[j])
            return ids[pc.index_in(values, value_set=distinct).to_numpy(zero_copy_only=False)].astype(np.int64)
        if self._item_array is None:
            self._item_array = pa.array(self.item_tokens, type=pa.string())
        index = pc.index_in(values, value_set=self._item_array)
        token_ids = index.to_numpy(zero_copy_only=False)
        missing = index.is_null().to_numpy(zero_copy_only=False)
        if missing.any():
            token_ids = np.where(missing, 0, token_ids).astype(np.int64)
            unseen = pc.filter(values, pc.is_null(index))
            lookup = {item: self._convert_token_to_id(item) for item in pc.unique(unseen).to_pylist()}  # once per item
            token_ids[missing] = [lookup[v] for v in unseen.to_pylist()]
        return token_ids.astype(np.int64)

    def _lookup_small_vocab(self, values: Any, vocab: list[str], name: str, unknown_id: Optional[int]) -> np.ndarray:
        _require_pyarrow()

        index = pc.index_in(values, value_set=pa.array(vocab, type=pa.string()))
        if index.null_count:
            if unknown_id is None:
                bad = pc.unique(pc.filter(values, pc.is_null(index))).to_pylist()
                raise ValueError(f"Unknown {name} {bad[:5]}; this tokenizer knows {vocab[2:]}.")
            index = pc.fill_null(index, unknown_id)
        return index.to_numpy(zero_copy_only=False).astype(np.int64)

    def encode_sequences(
        self, sequences: Any, max_length: Optional[int] = None, windows: bool = False, hold_out_last: bool = False
    ) -> Any:
        """
        Encode a whole table of per-user sequences at once (no per-token Python loop).

        `sequences` is a `pyarrow.Table` (or a `datasets.Dataset`) with list columns `item_ids`, `actions`,
        `timestamps` and optionally `surfaces`. Returns a `pyarrow.Table` with list columns `input_ids`,
        `action_ids`, (`surface_ids`), `timestamps`, `attention_mask`. Each row keeps its `max_length` most recent
        events; with `windows=True` (training) each sequence is instead cut into consecutive `max_length` chunks from
        its end, so every event is used, and chunks of a single event (nothing to predict) are dropped and counted.
        With `hold_out_last=True` (evaluation) each row's last event becomes its `target_ids` / `target_action_ids`
        / `target_timestamps` (the request time of the prediction) and the inputs are the events before it.
        """
        _require_pyarrow()

        table = _as_arrow_table(sequences)
        max_length = max_length or self.model_max_length
        items = table.column("item_ids").combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64)
        if hold_out_last and windows:
            raise ValueError("`windows` and `hold_out_last` cannot be combined.")
        if hold_out_last and (np.diff(offsets) < 2).any():
            row = int(np.argmax(np.diff(offsets) < 2))
            raise ValueError(f"Row {row} has fewer than 2 events: nothing to hold out as a target.")
        starts, ends = self._chunk_bounds(offsets, max_length, windows, hold_out_last)
        keep = ends - starts
        new_offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
        take = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1] - starts, keep)  # flat indices

        def list_column(flat: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(flat[take], type=dtype))

        flat_items = items.values[offsets[0] : offsets[-1]] if len(items) else items.values
        flat_ids = self.item_ids_to_token_ids(flat_items)
        columns = {"input_ids": list_column(flat_ids, pa.int64())}
        flat_actions = None
        if "actions" in table.column_names:
            flat = table.column("actions").combine_chunks().flatten()
            flat_actions = self._lookup_small_vocab(flat, self.action_tokens, "actions", None)
            columns["action_ids"] = list_column(flat_actions, pa.int64())
        if "surfaces" in table.column_names and self.surface_tokens:
            flat = table.column("surfaces").combine_chunks().flatten()
            columns["surface_ids"] = list_column(self._lookup_small_vocab(flat, self.surface_tokens, "surfaces", 1), pa.int64())
        if "timestamps" in table.column_names:
            flat = table.column("timestamps").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            columns["timestamps"] = list_column(flat, pa.int64())
            if hold_out_last:
                columns["target_timestamps"] = pa.array(flat[ends], type=pa.int64())
        columns["attention_mask"] = list_column(np.ones(offsets[-1] - offsets[0], dtype=np.int8), pa.int8())
        if hold_out_last:
            last = ends  # the event right after each input window
            columns["target_ids"] = pa.array(flat_ids[last], type=pa.int64())
            if flat_actions is not None:
                columns["target_action_ids"] = pa.array(flat_actions[last], type=pa.int64())
        return pa.table(columns)

    @staticmethod
    def _chunk_bounds(
        offsets: np.ndarray, max_length: int, windows: bool, hold_out_last: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flat `[start, end)` of each output row, relative to the first list's offset."""
        offsets = offsets - offsets[0]
        lengths = np.diff(offsets) - int(hold_out_last)
        if not windows:
            ends = offsets[:-1] + lengths
            return ends - np.minimum(lengths, max_length), ends
        num_chunks = np.maximum(-(-lengths // max_length), 1)  # ceil, at least one row per user
        row = np.repeat(np.arange(len(lengths)), num_chunks)
        # chunk k counts back from the end; emit oldest first within a user
        k = np.concatenate([np.arange(n)[::-1] for n in num_chunks]) if len(num_chunks) else np.zeros(0, dtype=np.int64)
        ends = offsets[1:][row] - k * max_length
        starts = np.maximum(ends - max_length, offsets[:-1][row])
        useful = (ends - starts) >= 2
        dropped = int((~useful).sum())
        if dropped:
            logger.info("Dropped %d single-event chunks (no next event to predict) while windowing.", dropped)
        return starts[useful], ends[useful]

    def item_counts(self, sequences: Any) -> np.ndarray:
        """Event count of every item token id in encoded sequences (`input_ids` column): popularity for sampling."""
        table = _as_arrow_table(sequences)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for chunk in table.column("input_ids").chunks:  # a chunk at a time: the table may be memory-mapped and large
            counts += np.bincount(chunk.flatten().to_numpy(zero_copy_only=False), minlength=self.vocab_size)
        return counts


__all__ = [
    "VocabularyIndex",
    "PinFMTokenizer",
    "check_tokenizer_matches_model",
    "stable_bucket",
    "CANDIDATE_ACTION_ID",
    "CANDIDATE_ITEM_ID",
]
