"""Serve a CTR ranker over HTTP: post a user's raw event history and candidate item ids, get the candidates' scores.

    pip install -e ".[serve]"
    python recipes/serve.py --model outputs/ctr_ml1m_like/model                     # a fully fine-tuned ranker
    python recipes/serve.py --model outputs/ml1m_ctr_base/model --adapter outputs/ctr_ml1m_like/adapter  # base + LoRA
    python recipes/serve.py --model org/pinfm-ml1m --adapter org/pinfm-ml1m-like --port 8000            # hub repo ids

    curl -s localhost:8000/health
    curl -s localhost:8000/score -H 'content-type: application/json' -d '{"candidates": ["661", "914"],
      "history": [{"item_id": "1193", "action": "rating_5", "timestamp": 978300760}], "request_time": 978300800}'

`POST /score` takes `{"history", "candidates", "request_time"?}`: the history as the recommendation pipeline takes it (a
list of `{"item_id", "action", "timestamp"[, "surface"]}` events, or a dict of such columns), the raw item ids to score
and the request's unix seconds (default: the last event's). It answers `{"scores": [...], "logits": [...]}`, one per
candidate in the order given (`scores` = sigmoid of `logits`: the predicted probability). A bad request gets a 422 whose
`detail` names the field. Concurrent requests are scored together in micro-batches (`--max_batch_size`,
`--max_wait_ms`); `GET /health` reports readiness and the batches served. LoRA adapters are merged into the weights.
"""

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, StrictInt, StrictStr

from pinfm_hf import PinFMForCTR, PinFMTokenizer
from pinfm_hf.hub import check_model_reference
from pinfm_hf.serving import PinFMCandidateScorer, PinFMMicroBatcher, tune_allocator
from pinfm_hf.training_utils import parse_recipe_args
from pinfm_hf.transfer import load_ctr_adapters


@dataclass
class ServeArguments:
    model: str = field(metadata={"help": "Fine-tuned ranker, or with --adapter its pretrained base: folder or hub repo id."})
    adapter: Optional[str] = field(default=None, metadata={"help": "LoRA use-case adapter (finetune_ctr.py --transfer lora)."})
    revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --model."})
    adapter_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a hub --adapter."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads; 0 keeps torch's default (all cores)."})
    max_history: Optional[int] = field(default=None, metadata={"help": "Most recent events per request (default: the tokenizer's)."})
    max_candidates: int = field(default=10_000, metadata={"help": "Most candidates one request may ask to score."})
    max_batch_size: int = field(default=16, metadata={"help": "Most requests scored together in one micro-batch."})
    max_wait_ms: float = field(default=2.0, metadata={"help": "Longest a request waits for others to join its batch."})
    item_embedding_quantization: Optional[str] = field(
        default=None, metadata={"help": "Serve with row-wise quantised item tables: 'int8' or 'int4'."}
    )
    log_level: str = field(default="warning", metadata={"help": "uvicorn's log level."})


class ScoreRequest(BaseModel):
    """The body of `POST /score`; the history's events are checked by the scorer, which names the bad event."""

    history: Union[list[Any], dict[str, list[Any]]]
    candidates: list[Union[StrictStr, StrictInt]]
    request_time: Optional[StrictInt] = None


def load_scorer(args: ServeArguments) -> PinFMCandidateScorer:
    """The ranker of `--model` (plus `--adapter`, merged) and its tokenizer, ready to score."""
    check_model_reference(args.model, flag="--model")
    tokenizer = PinFMTokenizer.from_pretrained(args.model, revision=args.revision)
    if args.adapter is not None:
        check_model_reference(args.adapter, flag="--adapter")
        model = load_ctr_adapters(
            args.model, {"serve": args.adapter}, revision=args.revision, adapter_revisions={"serve": args.adapter_revision}
        ).merge_and_unload()
    else:
        model, info = PinFMForCTR.from_pretrained(args.model, revision=args.revision, output_loading_info=True)
        if any(key.startswith("ctr_head.") for key in info["missing_keys"]):
            raise ValueError(
                f"--model {args.model!r} has no ranking head (a pretrained base?): give its use case with --adapter, or "
                "a ranker fine-tuned with full transfer."
            )
    if args.item_embedding_quantization is not None:
        model = model.quantize_item_embeddings(args.item_embedding_quantization)
    return PinFMCandidateScorer(model, tokenizer, max_history=args.max_history)


def field_message(error: dict[str, Any]) -> str:
    """`candidates.2: Input should be a valid string`: the field's path in the body, then what is wrong with it."""
    if error.get("type") == "json_invalid":  # its `loc` is ("body", character): not a field
        return f"body: {error.get('msg', 'invalid JSON')} at character {error.get('loc', ('', '?'))[-1]}"
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{location or 'body'}: {error.get('msg', 'invalid')}"


def build_app(scorer: PinFMCandidateScorer, args: ServeArguments) -> FastAPI:
    """The HTTP app: `POST /score` through a micro-batcher of `scorer`, `GET /health`."""

    def score_batch(requests: list) -> list[list[float]]:
        return [logits.tolist() for logits in scorer.score_encoded(requests)]

    batcher = PinFMMicroBatcher(score_batch, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="PinFM ranker", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": "; ".join(field_message(e) for e in error.errors())})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        sizes = batcher.batch_sizes
        return {
            "status": "ok", "model": args.model, "adapter": args.adapter, "max_history": scorer.max_history,
            "batches": len(sizes), "requests": sum(sizes), "largest_batch": max(sizes, default=0),
        }

    @app.post("/score")
    async def score(body: ScoreRequest) -> dict[str, list[float]]:
        if len(body.candidates) > args.max_candidates:
            raise HTTPException(422, f"candidates: {len(body.candidates)} given, at most {args.max_candidates} per request.")
        try:
            encoded = scorer.encode(body.history, body.candidates, body.request_time)
        except (ValueError, TypeError) as error:
            message = str(error)
            raise HTTPException(422, message if message.startswith("`") else f"history: {message}") from None
        logits = await batcher.submit(encoded)
        return {"scores": torch.tensor(logits).sigmoid().tolist(), "logits": logits}

    return app


def main(argv: Optional[list[str]] = None) -> None:
    import uvicorn

    (args,) = parse_recipe_args((ServeArguments,), argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tune_allocator()  # activations reuse freed pages: ~1300 fewer page faults per request of 1000 candidates
    start = time.time()
    scorer = load_scorer(args)
    print(f"Loaded {args.model}{' + ' + args.adapter if args.adapter else ''} in {time.time() - start:.1f} s; "
          f"serving on http://{args.host}:{args.port} ({torch.get_num_threads()} torch threads)", flush=True)
    uvicorn.run(build_app(scorer, args), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
