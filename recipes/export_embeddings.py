"""Export user and item embeddings of a pretrained PinFM model to Parquet, for a retrieval index.

    python recipes/export_embeddings.py --model outputs/pretrain/model --dataset ml-1m --output_dir outputs/embeddings
    python recipes/export_embeddings.py --model user/pinfm-ml1m --revision <sha> --dataset taobao --output_dir out/emb
    python recipes/export_embeddings.py --model outputs/pretrain/model --dataset ml-1m --ann_index  # + a FAISS index

Reads events the way recipes/pretrain.py does (`--dataset`/`--data_dir`/`--columns`), groups them into each user's
full time-ordered history, and writes to `--output_dir`, each file atomically (temporary file, then `os.replace`):
`item_embeddings.parquet` (`item_id`, `embedding`), `user_embeddings.parquet` (`user_id`, `embedding`),
`embedding_info.json` (the temperature and what was exported) and a `README.md` on how to score with them:
`score = dot(user_embedding, item_embedding) / temperature`. With `--ann_index` (needs `pip install 'pinfm-hf[retrieval]'`)
also `ann_index/`: a nearest-neighbour index of the item embeddings (`pinfm_hf.retrieval.ItemIndex`; exact for small
catalogues, approximate above `--ann_exact_threshold` items), which the recommendation pipeline serves top-k from.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForPreTraining, AutoTokenizer

from pinfm_hf.data import EventSourceArguments, build_user_sequences
from pinfm_hf.embedding_export import export_item_embeddings, export_user_embeddings
from pinfm_hf.hub import check_model_reference
from pinfm_hf.io_utils import atomic_write, atomic_write_json, atomic_write_text
from pinfm_hf.retrieval import DEFAULT_EXACT_THRESHOLD, ItemIndex, import_faiss
from pinfm_hf.training_utils import configure_recipe_logging, parse_recipe_args


logger = logging.getLogger("export_embeddings")

README = """# PinFM embeddings

Exported from `{model}` (revision `{revision}`) with `recipes/export_embeddings.py`.

- `item_embeddings.parquet`: `item_id`, `embedding` ({num_items} items, {dim} float32 values each, L2-normalised).
- `user_embeddings.parquet`: `user_id`, `embedding` ({num_users} users: the query embedding at each user's last event).
- `embedding_info.json`: `temperature` ({temperature:.6g}) and what was exported.

Score a user against an item with `score = dot(user_embedding, item_embedding) / temperature`: the model's next-item
logit, as the `pinfm-recommendation` pipeline ranks by. The embeddings are normalised and the temperature is positive,
so an inner-product or cosine index returns the same top-k without it.

```python
import datasets
items = datasets.Dataset.from_parquet("item_embeddings.parquet").with_format("numpy")[:]
users = datasets.Dataset.from_parquet("user_embeddings.parquet").with_format("numpy")[:]
scores = users["embedding"] @ items["embedding"].T / {temperature:.6g}  # (num_users, num_items)
```
{ann_index}"""


ANN_README = """
`ann_index/` is a nearest-neighbour index of the item embeddings (`{index_factory}`, search parameters
`{search_parameters}`): top-k by inner product, ids are `item_id`s. It needs `pip install 'pinfm-hf[retrieval]'`.

```python
from transformers import pipeline
from pinfm_hf.retrieval import ItemIndex

index = ItemIndex.load("ann_index")
ids, scores = index.search(users["embedding"][:8], k=100)  # item ids and inner products, best first
recommend = pipeline("pinfm-recommendation", model="<model folder>", index=index)
```
"""


@dataclass
class DataArguments(EventSourceArguments):
    max_users: Optional[int] = field(default=None, metadata={"help": "Export the first N users only (smoke tests)."})


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "Saved PinFMForPretraining folder or hub repo id."})
    revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --model."})
    output_dir: str = field(default="outputs/embeddings", metadata={"help": "Folder of the Parquet files."})
    batch_size: int = field(default=256, metadata={"help": "Users encoded per forward pass."})
    device: Optional[str] = field(default=None, metadata={"help": "'cpu', 'cuda', ...; defaults to cuda when available."})
    ann_index: bool = field(
        default=False,
        metadata={
            "help": "Also build a nearest-neighbour index of the item embeddings (FAISS, inner product) and save it to "
            "<output_dir>/ann_index; load it with pinfm_hf.retrieval.ItemIndex.load and pass it to the pipeline as "
            "index=. Needs `pip install 'pinfm-hf[retrieval]'`."
        },
    )
    ann_index_factory: str = field(
        default="auto",
        metadata={
            "help": "FAISS factory string of the index ('Flat', 'HNSW32', 'IVF4096,PQ64x4fs,RFlat', ...); 'auto': exact "
            "up to --ann_exact_threshold items, else an IVF index with 4-bit fast-scan codes and exact re-ranking."
        },
    )
    ann_search_parameters: Optional[str] = field(
        default=None,
        metadata={
            "help": "FAISS search parameters saved with the index, e.g. 'nprobe=64,k_factor_rf=4'; defaults to those "
            "of the 'auto' factory (none for others)."
        },
    )
    ann_exact_threshold: int = field(
        default=DEFAULT_EXACT_THRESHOLD, metadata={"help": "With --ann_index_factory auto: the largest catalogue indexed exactly."}
    )
    ann_threads: Optional[int] = field(default=None, metadata={"help": "Threads for building the index; defaults to all cores."})


def main(args: Optional[list[str]] = None) -> dict:
    data_args, export_args = parse_recipe_args((DataArguments, ExportArguments), args)
    check_model_reference(export_args.model, flag="--model")
    configure_recipe_logging()
    output_dir = Path(export_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = export_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if export_args.ann_index:
        import_faiss()  # fail now, not after the export, when the extra is missing

    # ----- setup: model, tokenizer, each user's full history -----
    model = AutoModelForPreTraining.from_pretrained(export_args.model, revision=export_args.revision).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_args.model, revision=export_args.revision)
    events = data_args.load_events()
    sequences = build_user_sequences(events)
    if data_args.max_users is not None:
        sequences = sequences.select(range(min(data_args.max_users, len(sequences))))
    logger.info("Exporting %d items and %d users from %s.", tokenizer.num_items, len(sequences), export_args.model)

    # ----- export -----
    items = export_item_embeddings(model, tokenizer, show_progress=True)
    users = export_user_embeddings(model, tokenizer, sequences, batch_size=export_args.batch_size, show_progress=True)

    ann_info = None
    if export_args.ann_index:
        index = ItemIndex.from_dataset(
            items, index_factory=export_args.ann_index_factory, search_parameters=export_args.ann_search_parameters,
            exact_threshold=export_args.ann_exact_threshold, num_threads=export_args.ann_threads,
        )
        ann_info = {"path": "ann_index", "index_factory": index.index_factory, "search_parameters": index.search_parameters}
        logger.info("Built %s.", index)

    # ----- save -----
    info = {
        "temperature": model.temperature.item(),
        "score": "dot(user_embedding, item_embedding) / temperature",
        "normalized": True,
        "dim": model.config.projection_size,
        "num_items": len(items),
        "num_users": len(users),
        "max_length": tokenizer.model_max_length,
        "model": export_args.model,
        "revision": export_args.revision,
        "ann_index": ann_info,
        **{f"data_{k}": v for k, v in asdict(data_args).items()},
    }
    atomic_write(output_dir / "item_embeddings.parquet", items.to_parquet)
    atomic_write(output_dir / "user_embeddings.parquet", users.to_parquet)
    if ann_info is not None:
        index.save(output_dir / "ann_index")
    elif (output_dir / "ann_index").exists():
        logger.warning("%s is from an earlier export, not this one: rebuild it (--ann_index) or delete it.", output_dir / "ann_index")
    atomic_write_json(output_dir / "embedding_info.json", info)
    readme = README.format(
        model=export_args.model, revision=export_args.revision or "default", num_items=len(items), num_users=len(users),
        dim=info["dim"], temperature=info["temperature"], ann_index=ANN_README.format(**ann_info) if ann_info else "",
    )
    atomic_write_text(output_dir / "README.md", readme)
    logger.info("Wrote %d item and %d user embeddings to %s.", len(items), len(users), output_dir)
    return info


if __name__ == "__main__":
    main()
