"""`PinFMRecommendationPipeline`: top-k next-item recommendations from one user's raw event history.

Saved model folders carry this file (a relative import of `modeling_pinfm.py`) and name it in
`config.custom_pipelines`, so `pipeline(model=folder, trust_remote_code=True)` works where pinfm_hf is not installed:
it imports only torch, transformers and its siblings.
"""

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from transformers import Pipeline
from transformers.utils import logging

from .tokenization_pinfm import SPECIAL_ACTION_TOKENS, check_tokenizer_matches_model


logger = logging.get_logger(__name__)

# Task name in the installed package's registry: `pipeline("pinfm-recommendation", model=folder)`.
PINFM_PIPELINE_TASK = "pinfm-recommendation"
# Task name saved in `config.custom_pipelines`. It differs from the registered one on purpose: transformers gives a
# folder's custom task precedence over the registry and then demands `trust_remote_code=True`, which would break
# `pipeline("pinfm-recommendation", model=folder)` for the installed package.
PINFM_REMOTE_PIPELINE_TASK = "pinfm-recommendation-remote"
EVENT_FIELDS = ("item_id", "action", "timestamp")
SURFACE_FIELD = "surface"
_INTEGER = re.compile(r"^[+-]?\d+$")
# `__call__` keywords; anything else is a typo, not a parameter to ignore silently.
_CALL_PARAMETERS = ("top_k", "exclude_history", "exclude_items", "request_time", "batch_size", "num_workers")

History = Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Any]]]


def saved_custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `config.custom_pipelines` entry of a saved folder, as `Pipeline.save_pretrained` would write it."""
    return {
        PINFM_REMOTE_PIPELINE_TASK: {
            "impl": "pipeline_pinfm.PinFMRecommendationPipeline",
            "pt": ["AutoModelForPreTraining"],
            "type": "text",
        }
    }


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _iter_events(history: History) -> Iterable[tuple[int, Mapping[str, Any]]]:
    """`(index, event)` pairs of a list of event dicts or of a dict of equally long columns."""
    if isinstance(history, Mapping):
        missing = [field for field in EVENT_FIELDS if field not in history]
        if missing:
            raise ValueError(f"The history has no `{missing[0]}` column; a dict of columns needs {list(EVENT_FIELDS)}.")
        columns = {field: list(values) for field, values in history.items() if field in (*EVENT_FIELDS, SURFACE_FIELD)}
        n = len(columns["item_id"])
        for field, values in columns.items():
            if len(values) != n:
                raise ValueError(f"Column `{field}` has {len(values)} values, but `item_id` has {n}.")
        return ((i, {field: values[i] for field, values in columns.items()}) for i in range(n))
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        return enumerate(history)
    raise TypeError(
        f"A history is a list of event dicts {{'item_id', 'action', 'timestamp'[, 'surface']}} or a dict of such "
        f"columns, got {type(history).__name__}."
    )


def validate_history(history: History, known_actions: Sequence[str]) -> dict[str, list]:
    """
    Check one user's raw history and return it as time-ordered columns `item_id` (str), `action`, `timestamp` (int)
    and `surface` (when every event has one). Events with equal timestamps keep their input order (stable sort).

    Raises `ValueError` naming the field and the event index (in input order) for a missing or empty field, a
    non-integer timestamp or an unknown action, and for an empty history.
    """
    known = set(known_actions)
    columns = {"item_id": [], "action": [], "timestamp": [], SURFACE_FIELD: []}
    for i, event in _iter_events(history):
        if not isinstance(event, Mapping):
            raise TypeError(f"Event {i} is a {type(event).__name__}, not a dict with fields {list(EVENT_FIELDS)}.")
        for field in EVENT_FIELDS:
            if _is_missing(event.get(field)):
                raise ValueError(f"Event {i}: `{field}` is missing or empty.")
        item_id, action, timestamp = (event[field] for field in EVENT_FIELDS)
        if isinstance(item_id, bool) or not isinstance(item_id, (str, numbers.Integral)):
            raise ValueError(f"Event {i}: `item_id` must be a string or an integer, got {item_id!r}.")
        if action not in known:
            raise ValueError(f"Event {i}: unknown `action` {action!r}; this model knows {sorted(known)}.")
        if isinstance(timestamp, str) and _INTEGER.match(timestamp.strip()):
            timestamp = int(timestamp)
        if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Integral):
            raise ValueError(f"Event {i}: `timestamp` must be an integer (unix seconds), got {timestamp!r}.")
        columns["item_id"].append(str(item_id))
        columns["action"].append(action)
        columns["timestamp"].append(int(timestamp))
        surface = event.get(SURFACE_FIELD)
        columns[SURFACE_FIELD].append(None if _is_missing(surface) else str(surface))
    n = len(columns["item_id"])
    if n == 0:
        raise ValueError("The history has no events: the model needs at least one to recommend from.")
    surfaces = columns.pop(SURFACE_FIELD)
    given = [s is not None for s in surfaces]
    if any(given):
        if not all(given):
            raise ValueError(f"Event {given.index(False)}: `{SURFACE_FIELD}` is missing or empty, but other events have one.")
        columns[SURFACE_FIELD] = surfaces
    order = sorted(range(n), key=columns["timestamp"].__getitem__)  # stable: ties keep their input order
    return {field: [values[i] for i in order] for field, values in columns.items()}


def _is_single_history(inputs: Any) -> bool:
    """A dict of columns, or a list of event dicts (not a list of histories)."""
    if isinstance(inputs, Mapping):
        return True
    if isinstance(inputs, (list, tuple)) and inputs:
        first = inputs[0]
        # An event's `item_id` is a scalar; a dict of columns (one history of a batch) holds a list there.
        return isinstance(first, Mapping) and not isinstance(first.get("item_id"), (list, tuple))
    return False


class PinFMRecommendationPipeline(Pipeline):
    """
    Top-k next-item recommendation from one user's raw event history, with a [`PinFMForPretraining`] model and its
    [`PinFMTokenizer`].

    The history is encoded like training data (its most recent `tokenizer.model_max_length` events, at most the
    model's `config.max_position_embeddings`), the query
    embedding at the last event scores every item of the vocabulary (`model.score_next_items`: dot product of normalised
    embeddings over the temperature), and the best `top_k` are returned. Special tokens and hash buckets (ids of
    item ids unseen at tokenizer build) are never recommended.

    With `index=` (for catalogues too large to score in full), the top-k come from a nearest-neighbour index instead:
    any object with `search(queries, k, exclude) -> (ids, scores)` over this model's item embeddings, keyed by raw item
    id, such as `pinfm_hf.retrieval.ItemIndex` built from `export_item_embeddings` (exact or approximate). Scores are
    the same logits (inner product over the temperature); excluded items are filtered by the index.

    Example:

    ```python
    from transformers import pipeline

    recommend = pipeline("pinfm-recommendation", model="outputs/pretrain/model")  # pinfm_hf installed
    recommend = pipeline(model="outputs/pretrain/model", trust_remote_code=True)  # anywhere
    history = [{"item_id": "Toy Story (1995)", "action": "rating_5", "timestamp": 978300760}]
    recommend(history, top_k=3)  # [{"item_id": ..., "score": ...}, ...], best first
    recommend(history, top_k=3, request_time=978904760)  # recommending a week after the last event
    recommend([history, history[:1]], top_k=3, exclude_items=["Heat (1995)"])  # a batch: one list per user

    from pinfm_hf.retrieval import ItemIndex  # pip install 'pinfm-hf[retrieval]'

    index = ItemIndex.load("outputs/embeddings/ann_index")  # recipes/export_embeddings.py --ann_index
    recommend = pipeline("pinfm-recommendation", model="outputs/pretrain/model", index=index)
    ```
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, index: Optional[Any] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.eval()  # recommendations must not depend on dropout, whatever mode a passed model was left in
        if not hasattr(self.model, "score_next_items"):
            raise TypeError(
                f"{type(self.model).__name__} cannot score items: load the model with `AutoModelForPreTraining` "
                "(a PinFMForPretraining checkpoint)."
            )
        if self.tokenizer is None or not hasattr(self.tokenizer, "first_bucket_id"):
            raise TypeError("The recommendation pipeline needs the model's PinFMTokenizer.")
        # Another tokenizer's ids name other items: the scores would be right, the item names wrong.
        check_tokenizer_matches_model(self.tokenizer, self.model.config)
        if self.tokenizer.first_bucket_id <= self.model.config.num_special_item_tokens:
            raise ValueError(
                "This model is vocabulary-free (its tokenizer keeps no item, every id is hashed): the pipeline ranks a "
                "vocabulary's items and would have none to recommend. Serving such a model needs its catalogue of item "
                "ids, which is not supported yet."
            )
        self.max_events = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        if self.max_events < self.tokenizer.model_max_length:
            logger.warning(
                "The tokenizer keeps %d events but the model takes at most %d (`max_position_embeddings`): histories "
                "are cut to their %d most recent events.",
                self.tokenizer.model_max_length, self.max_events, self.max_events,
            )
        self.index = self._check_index(index)

    def _check_index(self, index: Optional[Any]) -> Optional[Any]:
        """Duck-typed (this file is remote code: no faiss, no pinfm_hf import): a `search` and, if known, the right size."""
        if index is None:
            return None
        if not callable(getattr(index, "search", None)):
            raise TypeError(f"`index` must have a `search(queries, k, exclude)` method, got {type(index).__name__}.")
        dim = getattr(index, "dim", None)
        if dim is not None and dim != self.model.config.projection_size:
            raise ValueError(
                f"The index holds {dim}-dimensional items but the model's embeddings have {self.model.config.projection_size}"
                " dimensions: build it from this model's exported item embeddings."
            )
        return index

    def __call__(self, inputs: Union[History, Sequence[History]], **kwargs) -> Union[list[dict], list[list[dict]]]:
        """
        Recommend items for one user or a batch of users.

        Args:
            inputs (`list[dict]`, `dict[str, list]` or a `list` of either):
                One user's raw history: event dicts `{"item_id", "action", "timestamp"[, "surface"]}` (any order;
                sorted by timestamp, stably), or a dict of such columns. A list of histories is a batch.
            top_k (`int`, *optional*, defaults to 10):
                Number of items to return (fewer when fewer items can be recommended).
            exclude_history (`bool`, *optional*, defaults to `True`):
                Leave out items already in the history.
            exclude_items (`Iterable[str]`, *optional*):
                Further raw item ids to leave out.
            request_time (`int`, *optional*):
                Unix seconds of the request, not before the last event. The model reads the gap from the last event
                to it (a user back after a week is not a user mid-session); defaults to the last event's time.
            batch_size (`int`, *optional*, defaults to 1):
                Histories encoded per forward pass for batch inputs.

        Returns:
            One user: `[{"item_id": str, "score": float}, ...]` by descending score (the logit of the next-item
            softmax); a batch: a list of these, in input order.
        """
        unknown = sorted(set(kwargs) - set(_CALL_PARAMETERS))
        if unknown:
            raise TypeError(f"Unknown parameter(s) {unknown}; the pipeline takes {list(_CALL_PARAMETERS)}.")
        if _is_single_history(inputs):
            # A list of events would otherwise be read as a batch: hand the base class one (column) history.
            return super().__call__(self._columns(inputs), **kwargs)
        if isinstance(inputs, (list, tuple)) and inputs:
            return super().__call__(list(inputs), **kwargs)
        raise ValueError(
            "Pass one user's history (a non-empty list of event dicts, or a dict of columns) or a list of histories."
        )

    def _sanitize_parameters(self, top_k=None, exclude_history=None, exclude_items=None, request_time=None, **kwargs):
        preprocess, forward = {}, {}
        if request_time is not None:
            if isinstance(request_time, bool) or not isinstance(request_time, numbers.Integral):
                raise ValueError(f"`request_time` must be an integer (unix seconds), got {request_time!r}.")
            preprocess["request_time"] = int(request_time)
        if exclude_history is not None:
            if not isinstance(exclude_history, (bool, numbers.Integral)) and type(exclude_history).__name__ != "bool_":
                raise TypeError(f"`exclude_history` must be a bool, got {exclude_history!r}.")  # "no" would be True
            preprocess["exclude_history"] = bool(exclude_history)
        if exclude_items is not None:
            if isinstance(exclude_items, (str, numbers.Integral)):
                exclude_items = [exclude_items]
            preprocess["exclude_items"] = [str(item) for item in exclude_items]
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
                raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
            forward["top_k"] = int(top_k)
        return preprocess, forward, {}

    def _columns(self, history: History) -> dict[str, list]:
        known_actions = self.tokenizer.action_tokens[len(SPECIAL_ACTION_TOKENS) :]
        return validate_history(history, known_actions)

    def preprocess(
        self,
        history: History,
        exclude_history: bool = True,
        exclude_items: Optional[list[str]] = None,
        request_time: Optional[int] = None,
    ) -> dict[str, torch.Tensor]:
        columns = self._columns(history)
        if request_time is None:
            request_time = columns["timestamp"][-1]
        elif request_time < columns["timestamp"][-1]:
            raise ValueError(
                f"`request_time` ({request_time}) is before the history's last event ({columns['timestamp'][-1]})."
            )
        tokenizer = self.tokenizer
        encoded = tokenizer.encode_events(
            columns["item_id"],
            actions=columns["action"],
            timestamps=columns["timestamp"],
            surfaces=columns.get(SURFACE_FIELD),
            max_length=self.max_events,
            return_tensors="pt",
        )
        excluded = list(exclude_items or [])
        if exclude_history:
            excluded += columns["item_id"]  # the whole history, also events older than the encoded window
        excluded_ids = {i for i in tokenizer.convert_tokens_to_ids(excluded) if i < tokenizer.first_bucket_id}
        # Id 0 (padding, never recommended anyway) keeps the tensor non-empty, so batches of histories pad it.
        model_inputs = {key: value.long() for key, value in encoded.items()}
        model_inputs["exclude_ids"] = torch.tensor([[0, *sorted(excluded_ids)]], dtype=torch.long)
        model_inputs["end_timestamps"] = torch.tensor([request_time], dtype=torch.long)
        return model_inputs

    def _forward(self, model_inputs: dict[str, torch.Tensor], top_k: int = 10) -> dict[str, torch.Tensor]:
        inputs = {key: value for key, value in model_inputs.items() if key != "exclude_ids"}
        query = self.model.next_item_query(**inputs)  # (B, P)
        if not torch.isfinite(query).all():  # else: no finite score, an empty answer
            raise ValueError("The model gives non-finite scores for this history: its weights hold NaN or inf.")
        if self.index is not None:
            return self._search_index(query, model_inputs["exclude_ids"], top_k)
        # Special tokens, hash buckets (ids that are not items) and the excluded items are never recommended.
        scores = self.model.score_next_items(
            query, num_scored_ids=self.tokenizer.first_bucket_id, exclude_ids=model_inputs["exclude_ids"]
        ).float()  # (B, V)
        top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
        return {"scores": top.values, "ids": top.indices}  # (B, k) each

    def _search_index(self, query: torch.Tensor, exclude_ids: torch.LongTensor, top_k: int) -> dict[str, torch.Tensor]:
        """
        Top-k from `self.index`, as token ids and logits like the full scoring path. The index speaks raw item ids: the
        excluded token ids (padding dropped) go to it as raw ids, and its answers come back as token ids. An index
        holds this model's items only, so exclusions outside the vocabulary (hash buckets) cannot be in it anyway.
        """
        tokenizer = self.tokenizer
        first_item = self.model.config.num_special_item_tokens
        exclude = [tokenizer.convert_ids_to_tokens([i for i in row.tolist() if i >= first_item]) for row in exclude_ids]
        k = min(top_k, len(self.index)) if hasattr(self.index, "__len__") else top_k
        found_ids, found_scores = self.index.search(query.detach().float().cpu().numpy(), k, exclude=exclude)
        scores = torch.as_tensor(found_scores, dtype=torch.float32) / self.model.temperature.detach().float().cpu()
        token_ids = torch.zeros(scores.shape, dtype=torch.long)  # padding id where the index found no item
        for row, items in enumerate(found_ids):
            found = torch.isfinite(scores[row]).nonzero().flatten().tolist()
            ids = tokenizer.convert_tokens_to_ids([str(items[j]) for j in found])
            for j, token_id, item in zip(found, ids, (items[j] for j in found)):
                if not first_item <= token_id < tokenizer.first_bucket_id:
                    raise ValueError(
                        f"The index returned item {item!r}, which this model's tokenizer does not know: build the index "
                        "from this model's exported item embeddings."
                    )
                token_ids[row, j] = token_id
        return {"scores": scores, "ids": token_ids}  # (B, k) each

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        scores, ids = model_outputs["scores"][0], model_outputs["ids"][0]
        keep = torch.isfinite(scores)  # fewer than top_k recommendable items: drop the excluded tail
        tokens = self.tokenizer.convert_ids_to_tokens(ids[keep].tolist())
        return [{"item_id": token, "score": score} for token, score in zip(tokens, scores[keep].tolist())]


__all__ = [
    "PINFM_PIPELINE_TASK",
    "PINFM_REMOTE_PIPELINE_TASK",
    "PinFMRecommendationPipeline",
    "saved_custom_pipelines",
    "validate_history",
]
