"""
Serving a [`PinFMForCTR`] ranker at request latency: raw events and candidate ids in, scores out.

- [`PinFMRequestEncoder`] tokenises a request (one user's raw event history, as the recommendation pipeline takes it,
  and the candidates' raw item ids) with one dict lookup per event instead of the generic tokenizer's per-token path.
- [`PinFMCandidateScorer`] runs the DCAT request path (context pass, crossing pass, head) on a request or on a
  micro-batch of them: eager, or compiled ahead of time with AOTInductor (`compile=True`).
- [`PinFMMicroBatcher`] gathers the concurrent requests of an asyncio server into such micro-batches.
- [`export_scorer`] writes the scorer as a `torch.export` program (or, with `compile=True`, an AOTInductor package)
  that runs where neither pinfm_hf nor transformers is installed.

`recipes/serve.py` puts these behind HTTP; `benchmarks/bench_serving_latency.py` measures them.
"""

import array
import asyncio
import ctypes
import ctypes.util
import itertools
import json
import numbers
import operator
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .modeling_pinfm_ctr import PinFMForCTR
from .pipeline_pinfm import EVENT_FIELDS, SURFACE_FIELD, History, validate_history
from .tokenization_pinfm import SPECIAL_ACTION_TOKENS, PinFMTokenizer, check_tokenizer_matches_model


logger = logging.get_logger(__name__)

# What an exported scorer takes (keywords), and the JSON that describes them inside its archive.
EXPORTED_INPUTS = {
    "input_ids": "(U, T) item token ids of each history, oldest first (0 at padding)",
    "attention_mask": "(U, T) 1 for real events, 0 for padding (either side)",
    "action_ids": "(U, T) action token ids",
    "timestamps": "(U, T) event times in unix seconds, non-decreasing over the real events",
    "candidate_ids": "(U, C) item token ids to score",
    "request_timestamps": "(U,) unix seconds of each request (the candidates' time)",
}
EXPORT_SPEC_FILE = "pinfm_scorer.json"


@dataclass
class PinFMEncodedRequest:
    """
    One tokenised request: the user's most recent events and the candidates, as token ids.

    Args:
        input_ids, action_ids, timestamps (`torch.LongTensor` of shape `(num_events,)`): the history, oldest first.
        candidate_ids (`torch.LongTensor` of shape `(num_candidates,)`): the candidates' item token ids.
        request_time (`int`): unix seconds of the request (the candidates' timestamp).
    """

    input_ids: torch.LongTensor
    action_ids: torch.LongTensor
    timestamps: torch.LongTensor
    candidate_ids: torch.LongTensor
    request_time: int

    @property
    def num_candidates(self) -> int:
        return self.candidate_ids.numel()


class PinFMRequestEncoder:
    """
    Tokenises scoring requests like [`PinFMTokenizer.encode_events`] after
    [`~pinfm_hf.pipeline_pinfm.validate_history`], with the same ids and the same errors, but with one dict lookup per
    event in the common case (integer timestamps already in time order, no surfaces). Anything else (string
    timestamps, unsorted events, surfaces, malformed input) goes through `validate_history` itself. Surfaces are
    checked but not encoded: the scorer serves models without a surface table.

    Args:
        tokenizer (`PinFMTokenizer`): the model's tokenizer.
        max_history (`int`): most recent events kept per request.
    """

    def __init__(self, tokenizer: PinFMTokenizer, max_history: int):
        if max_history < 1:
            raise ValueError(f"`max_history` must be a positive integer, got {max_history}.")
        self.tokenizer = tokenizer
        self.max_history = max_history
        self.known_actions = tokenizer.action_tokens[len(SPECIAL_ACTION_TOKENS) :]
        self._action_ids = {action: tokenizer.action_to_id[action] for action in self.known_actions}
        self._item_ids = tokenizer.item_to_id
        # Large vocabularies keep their items in an Arrow index, not in `item_to_id`: look those up in bulk.
        self._bulk_lookup = len(tokenizer.item_to_id) < tokenizer.first_bucket_id

    def item_token_ids(self, item_ids: Sequence[Any], field: str) -> list[int]:
        """
        Token ids of raw item ids (strings, or integers as their decimal string); unseen ids go to hash buckets.
        Raises `ValueError` naming `field[i]` for an id that is neither.
        """
        if isinstance(item_ids, (str, bytes, Mapping)) or not isinstance(item_ids, Sequence):
            raise ValueError(f"`{field}` must be a list of item ids, got {type(item_ids).__name__}.")
        if self._bulk_lookup:
            items = [self._item_string(item, f"{field}[{i}]") for i, item in enumerate(item_ids)]
            return self.tokenizer.item_ids_to_token_ids(items).tolist() if items else []
        get = self._item_ids.get
        try:  # a known item is a valid id by construction: only the others need checking
            ids = [get(item) for item in item_ids]
        except TypeError:  # an unhashable id, refused below
            ids = [get(item) if isinstance(item, str) else None for item in item_ids]
        if None in ids:  # unseen items (their hash bucket) or invalid ones
            convert = self.tokenizer.convert_tokens_to_ids
            for i, token_id in enumerate(ids):
                if token_id is None:
                    ids[i] = convert(self._item_string(item_ids[i], f"{field}[{i}]"))
        return ids

    @staticmethod
    def _item_string(item: Any, field: str) -> str:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            return str(int(item))
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"`{field}` must be a non-empty string or an integer item id, got {item!r}.")
        return item

    def encode_history(self, history: History) -> tuple[list[int], list[int], list[int]]:
        """Item and action token ids and timestamps of the `max_history` latest events (raises `ValueError` if invalid)."""
        fast = self._fast_history(history)
        if fast is not None:
            return fast
        columns = validate_history(history, self.known_actions)
        start = max(len(columns["item_id"]) - self.max_history, 0)
        return (
            self.item_token_ids(columns["item_id"][start:], "history.item_id"),
            [self._action_ids[action] for action in columns["action"][start:]],
            columns["timestamp"][start:],
        )

    def _fast_history(self, history: Any) -> Optional[tuple[list[int], list[int], list[int]]]:
        """`encode_history` of a well-formed history without surfaces, in time order, integer timestamps; else None."""
        try:
            if isinstance(history, Mapping):
                if SURFACE_FIELD in history:
                    return None
                items, actions, times = (history[field] for field in EVENT_FIELDS)
                if not (type(items) is list and type(actions) is list and type(times) is list):
                    return None
            elif type(history) is list:
                if any(type(event) is not dict or len(event) != 3 for event in history):  # a surface, or malformed
                    return None
                items = [event["item_id"] for event in history]
                actions = [event["action"] for event in history]
                times = [event["timestamp"] for event in history]
            else:
                return None
            n = len(items)
            if n == 0 or len(actions) != n or len(times) != n:
                return None
            if not all(type(t) is int for t in times) or not all(map(operator.le, times, itertools.islice(times, 1, None))):
                return None
            action_ids = [self._action_ids.get(action) for action in actions]
            if None in action_ids:
                return None
            # Every event is checked (as `validate_history` does), the latest `max_history` are kept.
            item_ids = self.item_token_ids(items, "history.item_id")
        except (KeyError, TypeError, ValueError):  # the reference path raises the error that names the event
            return None
        start = max(n - self.max_history, 0)
        return item_ids[start:], action_ids[start:], times[start:]

    def encode(
        self,
        history: History,
        candidates: Sequence[Any],
        request_time: Optional[int] = None,
    ) -> PinFMEncodedRequest:
        """
        Tokenise one request. `history` is one user's raw events (a list of `{"item_id", "action", "timestamp"
        [, "surface"]}` dicts or a dict of such columns); `candidates` the raw item ids to score; `request_time` the
        unix seconds of the request, not before the last event (defaults to it). Raises `ValueError` naming the field.
        """
        item_ids, action_ids, times = self.encode_history(history)
        if request_time is None:
            request_time = times[-1]
        elif isinstance(request_time, bool) or not isinstance(request_time, numbers.Integral):
            raise ValueError(f"`request_time` must be an integer (unix seconds), got {request_time!r}.")
        elif request_time < times[-1]:
            raise ValueError(f"`request_time` ({request_time}) is before the history's last event ({times[-1]}).")
        candidate_ids = self.item_token_ids(candidates, "candidates")
        if not candidate_ids:
            raise ValueError("`candidates` is empty: give at least one item id to score.")
        return PinFMEncodedRequest(
            input_ids=long_tensor(item_ids, "history.item_id"),
            action_ids=long_tensor(action_ids, "history.action"),
            timestamps=long_tensor(times, "history.timestamp"),
            candidate_ids=long_tensor(candidate_ids, "candidates"),
            request_time=int(request_time),
        )


def long_tensor(values: list[int], field: str) -> torch.LongTensor:
    """`torch.tensor(values)`, 3-7x faster for long lists (through a C array); a value outside int64 names `field`."""
    try:
        return torch.frombuffer(array.array("q", values), dtype=torch.long) if values else torch.zeros(0, dtype=torch.long)
    except OverflowError:
        raise ValueError(f"`{field}` holds a value outside the 64-bit integer range.") from None


def merged_ctr_model(model: nn.Module) -> PinFMForCTR:
    """
    The plain ranker to serve: LoRA adapters merged into the weights (a `PeftModel` is unwrapped), in eval mode.
    Rankers that read side features or surfaces are refused: the request carries neither.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if getattr(getattr(model, "config", None), "model_type", None) != "pinfm" or not hasattr(model, "score_candidates"):
        raise TypeError(f"Serving needs a PinFMForCTR ranker, got {type(model).__name__}.")
    if model.config.ctr_feature_vocab_size:
        raise ValueError(
            "This ranker reads side features (`ctr_feature_vocab_size` > 0), which a scoring request does not carry: "
            "serve a ranker fine-tuned without user or item features."
        )
    if model.config.surface_vocab_size:
        raise ValueError(
            "This ranker reads surfaces (`surface_vocab_size` > 0), which a scoring request does not carry: serve a "
            "ranker trained without surfaces."
        )
    return model.eval()


class PinFMScoringModule(nn.Module):
    """
    The DCAT scorer as a module of tensors only (what is exported and compiled): histories `(U, T)` and a `(U, C)`
    grid of candidates -> logits `(U, C)`, through `PinFMForCTR.score_candidates` without deduplication. Inputs are
    those of [`EXPORTED_INPUTS`].

    Args:
        model (`PinFMForCTR`): the (merged) ranker.
        leading_padding (`int`, *optional*, defaults to 0):
            Padding events put in front of every history. Export uses 2: `torch.export` specialises slices of size 0
            and 1, and the time features slice the history one event shorter, so without them one graph would not
            cover histories of 1 or 2 events. Padding leaves the scores as they are.
    """

    def __init__(self, model: PinFMForCTR, leading_padding: int = 0):
        super().__init__()
        self.model = model
        self.leading_padding = leading_padding

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        action_ids: torch.LongTensor,
        timestamps: torch.LongTensor,
        candidate_ids: torch.LongTensor,
        request_timestamps: torch.LongTensor,
    ) -> torch.Tensor:
        if self.leading_padding:
            input_ids, attention_mask, action_ids, timestamps = (
                F.pad(x, (self.leading_padding, 0)) for x in (input_ids, attention_mask, action_ids, timestamps)
            )
        return self.model.score_candidates(
            input_ids=input_ids, attention_mask=attention_mask, action_ids=action_ids, timestamps=timestamps,
            candidate_ids=candidate_ids, request_timestamps=request_timestamps, deduplicate=False,
        )


class PinFMCandidateScorer:
    """
    The request path of a [`PinFMForCTR`] ranker: raw request -> tokens -> DCAT context pass -> crossing pass -> head.

    A micro-batch of requests is scored in one call: histories left-padded to the longest, candidates as a `(U, C)`
    grid (shorter lists padded, their padded scores dropped). The logits equal those of appending each candidate to
    the history and running the model's `forward` (within float error).

    Args:
        model (`PinFMForCTR` or a `PeftModel` around one): the ranker; adapters are merged.
        tokenizer (`PinFMTokenizer`): the model's tokenizer.
        max_history (`int`, *optional*):
            Most recent events kept per request; defaults to `tokenizer.model_max_length`, at most
            `config.max_position_embeddings - 1` (the candidate takes the last position).
        compile (`bool`, *optional*, defaults to `False`):
            Score through an AOTInductor build of the scorer ([`export_scorer`] with `compile=True`): fused kernels
            and no per-operator Python, for any history length, candidate count and batch size; the build takes about
            a minute (a C++ compiler is needed) and is written to `compiled_path` (default: a temporary file).
        compiled_path (`str` or `Path`, *optional*): where the compiled package goes; an existing one is reused.

    Example:

    ```python
    scorer = PinFMCandidateScorer(PinFMForCTR.from_pretrained(folder), PinFMTokenizer.from_pretrained(folder))
    history = [{"item_id": "1193", "action": "rating_5", "timestamp": 978300760}]
    scorer.score(history, ["661", "914"]).sigmoid()  # click probabilities, one per candidate
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PinFMTokenizer,
        max_history: Optional[int] = None,
        compile: bool = False,
        compiled_path: Optional[Union[str, Path]] = None,
    ):
        self.model = merged_ctr_model(model)
        check_tokenizer_matches_model(tokenizer, self.model.config)
        limit = self.model.config.max_position_embeddings - 1
        self.max_history = min(max_history or tokenizer.model_max_length, limit)
        self.encoder = PinFMRequestEncoder(tokenizer, self.max_history)
        self.device = self.model.device
        self.compiled = compile
        if compile:
            if compiled_path is None:
                self._build_dir = tempfile.TemporaryDirectory(prefix="pinfm-scorer-")
                compiled_path = Path(self._build_dir.name) / "scorer_aoti.pt2"
            if not Path(compiled_path).is_file():
                export_scorer(self.model, compiled_path, max_history=self.max_history, compile=True)
            self.forward = load_exported_scorer(compiled_path)
        else:
            self.forward = PinFMScoringModule(self.model)

    def encode(self, history: History, candidates: Sequence[Any], request_time: Optional[int] = None) -> PinFMEncodedRequest:
        """Tokenise one raw request ([`PinFMRequestEncoder.encode`]); raises `ValueError` naming the bad field."""
        return self.encoder.encode(history, candidates, request_time)

    def score(self, history: History, candidates: Sequence[Any], request_time: Optional[int] = None) -> torch.Tensor:
        """Logits `(num_candidates,)` of one raw request; `sigmoid` gives the click (conversion) probabilities."""
        return self.score_encoded([self.encode(history, candidates, request_time)])[0]

    @torch.inference_mode()
    def score_encoded(self, requests: Sequence[PinFMEncodedRequest]) -> list[torch.Tensor]:
        """Logits of each of a micro-batch of encoded requests, in one call: a list of `(num_candidates,)` tensors."""
        if not requests:
            return []
        logits = self.forward(**self.collate(requests)).float()  # (U, C)
        return [row[: request.num_candidates] for row, request in zip(logits, requests)]

    def collate(self, requests: Sequence[PinFMEncodedRequest]) -> dict[str, torch.Tensor]:
        """The [`PinFMScoringModule`] inputs of a micro-batch: histories left-padded, candidates padded to a grid."""

        def pad(values: list[torch.Tensor], left: bool) -> torch.Tensor:
            width = max(v.numel() for v in values)
            if all(v.numel() == width for v in values):
                return torch.stack(values)
            out = torch.zeros(len(values), width, dtype=torch.long)
            for row, v in enumerate(values):
                start = width - v.numel() if left else 0
                out[row, start : start + v.numel()] = v
            return out

        batch = {
            "input_ids": pad([r.input_ids for r in requests], left=True),
            "attention_mask": pad([torch.ones(r.input_ids.numel(), dtype=torch.long) for r in requests], left=True),
            "action_ids": pad([r.action_ids for r in requests], left=True),
            "timestamps": pad([r.timestamps for r in requests], left=True),
            # Padded slots score item 0 (padding), a valid row whose score is dropped.
            "candidate_ids": pad([r.candidate_ids for r in requests], left=False),
            "request_timestamps": torch.tensor([r.request_time for r in requests]),
        }
        return {key: value.to(self.device) for key, value in batch.items()}


class PinFMMicroBatcher:
    """
    Micro-batching for an asyncio server: concurrent `submit`s wait at most `max_wait_ms` for company (up to
    `max_batch_size` requests), then one worker thread scores them together with `score_batch`. One worker: the
    model runs one batch at a time on its threads, and the event loop stays free to accept requests meanwhile.

    Args:
        score_batch (`Callable[[list], list]`): scores a list of requests, one result each, in order.
        max_batch_size (`int`, *optional*, defaults to 16): most requests per batch.
        max_wait_ms (`float`, *optional*, defaults to 2.0): longest a request waits for others to join its batch.
    """

    def __init__(self, score_batch: Callable[[list], list], max_batch_size: int = 16, max_wait_ms: float = 2.0):
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, got {max_batch_size}.")
        if max_wait_ms < 0:
            raise ValueError(f"`max_wait_ms` must be >= 0, got {max_wait_ms}.")
        self.score_batch = score_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_sizes: list[int] = []  # every batch's size, for monitoring (and tests)
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pinfm-scorer")
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._worker = self._executor = self._queue = None

    async def submit(self, request: Any) -> Any:
        """Score one request with whatever else arrives meanwhile; raises what `score_batch` raised for its batch."""
        if self._queue is None:
            raise RuntimeError("The micro-batcher is not started: `await batcher.start()` first.")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:  # take what is already queued at once, else wait for more until the deadline
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(request, future) for request, future in batch if not future.cancelled()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.score_batch, [r for r, _ in batch])
            except Exception as error:  # the batch's requests all fail with it; the server goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def export_example_inputs(config: Any, num_users: int = 2, num_events: int = 8, num_candidates: int = 5) -> dict[str, torch.Tensor]:
    """Valid random inputs of [`PinFMScoringModule`] for `config` (fixed seed); the last user's history is left-padded."""
    g = torch.Generator().manual_seed(0)
    first_item = config.num_special_item_tokens
    attention_mask = torch.ones(num_users, num_events, dtype=torch.long)
    attention_mask[-1, : num_events // 2] = 0
    timestamps = torch.randint(1_000_000, 2_000_000, (num_users, num_events), generator=g).sort(dim=1).values
    return {
        "input_ids": torch.randint(first_item, config.item_vocab_size, (num_users, num_events), generator=g) * attention_mask,
        "attention_mask": attention_mask,
        "action_ids": torch.randint(2, config.action_vocab_size, (num_users, num_events), generator=g) * attention_mask,
        "timestamps": timestamps * attention_mask,
        "candidate_ids": torch.randint(first_item, config.item_vocab_size, (num_users, num_candidates), generator=g),
        "request_timestamps": timestamps[:, -1] + 60,
    }


def export_scorer(
    model: nn.Module, path: Union[str, Path], *, max_history: Optional[int] = None, compile: bool = False
) -> Path:
    """
    Write the ranker's DCAT scorer to `path` (`.pt2`), to run with torch alone (no pinfm_hf, no transformers):

    ```python
    scorer = torch.export.load("scorer.pt2").module()                    # compile=False: a torch.export program
    scorer = torch._inductor.aoti_load_package("scorer_aoti.pt2")        # compile=True: AOTInductor, compiled C++
    with torch.no_grad():
        logits = scorer(input_ids=..., attention_mask=..., action_ids=..., timestamps=..., candidate_ids=...,
                        request_timestamps=...)  # (U, C)
    ```

    Inputs are token ids from the model's `PinFMTokenizer` ([`EXPORTED_INPUTS`], also written into the archive as
    `pinfm_scorer.json` for a `torch.export` program): `U` users, histories of `T` events (1 to `max_history`, default
    `config.max_position_embeddings - 1`) and `C` candidates, all dynamic. LoRA adapters are merged first. The result
    is checked against the Python path (within 1e-5) before this returns; `compile=True` needs a C++ compiler and
    takes about a minute on one core.
    """
    model = merged_ctr_model(model)
    config = model.config
    limit = config.max_position_embeddings - 1
    max_history = min(max_history or limit, limit)
    module = PinFMScoringModule(model, leading_padding=2).eval()
    example = export_example_inputs(config)
    users = torch.export.Dim("users", min=1)
    events = torch.export.Dim("events", min=1, max=max(max_history, 2))
    candidates = torch.export.Dim("candidates", min=1)
    per_event = {0: users, 1: events}
    dynamic_shapes = {
        "input_ids": per_event, "attention_mask": per_event, "action_ids": per_event, "timestamps": per_event,
        "candidate_ids": {0: users, 1: candidates}, "request_timestamps": {0: users},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {
        "inputs": EXPORTED_INPUTS, "output": "(U, C) logits; sigmoid gives the probabilities",
        "max_history": max_history, "item_vocab_size": config.item_vocab_size,
        "item_embedding_quantization": config.item_embedding_quantization, "torch": torch.__version__,
    }
    with torch.no_grad():
        program = torch.export.export(module, (), example, dynamic_shapes=dynamic_shapes)
        if compile:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        else:
            torch.export.save(program, str(path), extra_files={EXPORT_SPEC_FILE: json.dumps(spec, indent=1)})
        expected = module(**example)
        got = load_exported_scorer(path)(**example)
    if not torch.allclose(got, expected, atol=1e-5, rtol=1e-5):
        raise RuntimeError(f"The exported scorer differs from the model by {float((got - expected).abs().max()):.3g}.")
    return path


def load_exported_scorer(path: Union[str, Path]) -> Callable[..., torch.Tensor]:
    """The scorer [`export_scorer`] wrote: a callable taking [`EXPORTED_INPUTS`] as keywords, returning logits `(U, C)`."""
    with zipfile.ZipFile(path) as archive:
        compiled = any("/data/aotinductor/" in name for name in archive.namelist())
    if compiled:
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(str(path)).module()


def tune_allocator() -> bool:
    """
    Keep freed memory in the process (glibc malloc), so that the megabyte-sized activations of every request reuse
    pages instead of mapping fresh ones: without it a request of 1000 candidates takes ~1300 page faults. Call it
    once at server start; returns False where glibc's `mallopt` is not available (the call then changes nothing).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20))
    )


__all__ = [
    "EXPORTED_INPUTS",
    "PinFMCandidateScorer",
    "PinFMEncodedRequest",
    "PinFMMicroBatcher",
    "PinFMRequestEncoder",
    "PinFMScoringModule",
    "export_scorer",
    "load_exported_scorer",
    "merged_ctr_model",
    "tune_allocator",
]
