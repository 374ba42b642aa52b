"""The serving request path (`pinfm_hf.serving`): tokenising raw requests, the fast DCAT path against the naive one,
micro-batching, and the exported scorer in a process without pinfm_hf and transformers."""

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pinfm_hf import PinFMConfig, PinFMForCTR, PinFMTokenizer
from pinfm_hf.modeling_pinfm import PINFM_LORA_TARGET_MODULES
from pinfm_hf.pipeline_pinfm import validate_history
from pinfm_hf.serving import (
    EXPORTED_INPUTS,
    PinFMCandidateScorer,
    PinFMMicroBatcher,
    PinFMScoringModule,
    export_example_inputs,
    export_scorer,
    load_exported_scorer,
    tune_allocator,
)


NUM_ITEMS, ACTIONS = 40, ["click", "like", "skip"]


def make_tokenizer(max_history: int = 12) -> PinFMTokenizer:
    return PinFMTokenizer(items=[f"m{i}" for i in range(NUM_ITEMS)], actions=ACTIONS, num_hash_buckets=8,
                          model_max_length=max_history)


def make_ranker(tokenizer: PinFMTokenizer, seed: int = 0, **overrides) -> PinFMForCTR:
    """A tiny ranker whose item bias is not zero (a trained one is not), so the scores depend on it."""
    torch.manual_seed(seed)
    config = PinFMConfig(**{
        "item_vocab_size": len(tokenizer), "action_vocab_size": tokenizer.action_vocab_size, "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
        "ctr_dropout": 0.0, "ctr_item_bias": True, **overrides,
    })
    model = PinFMForCTR(config).eval()
    with torch.no_grad():
        model.ctr_item_bias.weight.normal_()
    return model


def make_history(num_events: int, seed: int = 0, start: int = 1_000_000) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, NUM_ITEMS, (num_events,), generator=g).tolist()
    actions = torch.randint(0, len(ACTIONS), (num_events,), generator=g).tolist()
    gaps = torch.randint(0, 5000, (num_events,), generator=g).cumsum(0).tolist()
    return [{"item_id": f"m{i}", "action": ACTIONS[a], "timestamp": start + t} for i, a, t in zip(items, actions, gaps)]


def naive_logits(model: PinFMForCTR, encoded) -> torch.Tensor:
    """Each candidate appended to the history as its last token, the whole sequence encoded by `forward`."""
    C, T = encoded.num_candidates, encoded.input_ids.numel()
    with torch.no_grad():
        return model(
            input_ids=torch.cat([encoded.input_ids.expand(C, T), encoded.candidate_ids[:, None]], 1),
            action_ids=torch.cat([encoded.action_ids.expand(C, T), torch.ones(C, 1, dtype=torch.long)], 1),
            timestamps=torch.cat([encoded.timestamps.expand(C, T), torch.full((C, 1), encoded.request_time)], 1),
        ).logits


def reference_ids(tokenizer: PinFMTokenizer, history, max_history: int) -> dict[str, list[int]]:
    """The recommendation pipeline's tokenisation: `validate_history`, then `encode_events`."""
    columns = validate_history(history, ACTIONS)
    return tokenizer.encode_events(columns["item_id"], actions=columns["action"], timestamps=columns["timestamp"],
                                   max_length=max_history)


@pytest.mark.parametrize("form", ["events", "columns", "unsorted", "string_times", "integer_items", "long"])
def test_request_encoder_gives_the_pipeline_tokenisation(form):
    tokenizer = make_tokenizer()
    scorer = PinFMCandidateScorer(make_ranker(tokenizer), tokenizer)
    history = make_history(30 if form == "long" else 9, seed=3)
    history[2]["item_id"] = "never-seen-item"  # a hash bucket
    if form == "columns":
        history = {field: [event[field] for event in history] for field in ("item_id", "action", "timestamp")}
    elif form == "unsorted":
        history = history[::-1]
    elif form == "string_times":
        history = [{**event, "timestamp": str(event["timestamp"])} for event in history]
    elif form == "integer_items":
        history = [{**event, "item_id": 7} if i % 2 else event for i, event in enumerate(history)]
    candidates = ["m3", "unseen", 11, "m39"]
    encoded = scorer.encode(history, candidates, request_time=5_000_000)
    expected = reference_ids(tokenizer, history, scorer.max_history)
    assert encoded.input_ids.tolist() == expected["input_ids"]
    assert encoded.action_ids.tolist() == expected["action_ids"]
    assert encoded.timestamps.tolist() == expected["timestamps"]
    assert encoded.candidate_ids.tolist() == tokenizer.convert_tokens_to_ids(["m3", "unseen", "11", "m39"])
    assert encoded.request_time == 5_000_000
    assert len(encoded.input_ids) == min(len(expected["input_ids"]), 12)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r["history"][1].update(action="buy"), "`action`"),
        (lambda r: r["history"][2].pop("timestamp"), "timestamp`"),
        (lambda r: r["history"][0].update(item_id="  "), "`item_id`"),
        (lambda r: r.update(history=[]), "no events"),
        (lambda r: r.update(candidates=[]), "`candidates`"),
        (lambda r: r.update(candidates=["m1", True]), "`candidates[1]`"),
        (lambda r: r.update(candidates="m1"), "`candidates`"),
        (lambda r: r.update(request_time=5), "`request_time`"),
        (lambda r: r["history"][3].update(timestamp=2**70), "timestamp`"),
    ],
)
def test_bad_requests_raise_an_error_naming_the_field(change, field):
    tokenizer = make_tokenizer()
    scorer = PinFMCandidateScorer(make_ranker(tokenizer), tokenizer)
    request = {"history": make_history(6), "candidates": ["m1", "m2"], "request_time": None}
    change(request)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        scorer.encode(**request)


@pytest.mark.parametrize("fusion, quantization", [("early", None), ("late", None), ("early", "int8")])
def test_scorer_equals_the_naive_path_alone_and_in_a_ragged_micro_batch(fusion, quantization):
    tokenizer = make_tokenizer()
    model = make_ranker(tokenizer, ctr_fusion=fusion, ctr_head="dcn")
    if quantization:
        model.quantize_item_embeddings(quantization)
    scorer = PinFMCandidateScorer(model, tokenizer)
    requests = [
        scorer.encode(make_history(14, seed=1), [f"m{i}" for i in range(0, 40, 3)], request_time=2_000_000),
        scorer.encode(make_history(1, seed=2), ["m5", "fresh", "m7"]),  # one event, one unseen candidate
        scorer.encode(make_history(5, seed=3), ["m9"]),
    ]
    alone = [scorer.score_encoded([r])[0] for r in requests]
    together = scorer.score_encoded(requests)  # histories of 12, 1 and 5 events; 14, 3 and 1 candidates
    for request, single, batched in zip(requests, alone, together):
        naive = naive_logits(model, request)
        torch.testing.assert_close(single, naive, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert [t.shape[0] for t in together] == [14, 3, 1]
    # The item bias is on the path: zeroing it changes the scores by exactly its values.
    with torch.no_grad():
        bias = model.ctr_item_bias.weight[requests[0].candidate_ids].clone()
        model.ctr_item_bias.weight.zero_()
    torch.testing.assert_close(scorer.score_encoded([requests[0]])[0], alone[0] - bias, atol=1e-5, rtol=1e-5)


def test_fast_crossing_pass_equals_the_training_path_with_padding_and_empty_histories():
    """Inference (fused flash kernel, keys rotated back once per user) vs autograd's explicit softmax vs naive."""
    tokenizer = make_tokenizer()
    model = make_ranker(tokenizer, ctr_fusion="late", use_absolute_position_embeddings=True)
    g = torch.Generator().manual_seed(0)
    U, T, C = 4, 9, 6
    valid = torch.ones(U, T, dtype=torch.long)
    valid[1, :4] = 0  # left-padded
    valid[2, 6:] = 0  # right-padded
    valid[3] = 0  # no history at all
    users = {
        "input_ids": torch.randint(4, NUM_ITEMS, (U, T), generator=g) * valid,
        "action_ids": torch.randint(2, 5, (U, T), generator=g) * valid,
        "timestamps": torch.randint(0, 10**6, (U, T), generator=g).sort(dim=1).values * valid,
        "attention_mask": valid,
    }
    candidates = torch.randint(4, NUM_ITEMS, (U, C), generator=g)
    request = torch.full((U,), 2 * 10**6)
    with torch.inference_mode():
        fast = model.score_candidates(candidate_ids=candidates, request_timestamps=request, **users)
    explicit = model.score_candidates(candidate_ids=candidates, request_timestamps=request, **users)  # grad: explicit
    assert explicit.requires_grad
    torch.testing.assert_close(fast, explicit.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for u in range(U):
            history = valid[u].bool()
            ids = torch.cat([users["input_ids"][u][history].expand(C, -1), candidates[u][:, None]], 1)
            naive = model(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                action_ids=torch.cat([users["action_ids"][u][history].expand(C, -1), torch.ones(C, 1, dtype=torch.long)], 1),
                timestamps=torch.cat([users["timestamps"][u][history].expand(C, -1), request[u].expand(C, 1)], 1),
            ).logits
            torch.testing.assert_close(fast[u], naive, atol=1e-4, rtol=1e-4)


def test_scorer_merges_a_lora_adapter():
    tokenizer = make_tokenizer()
    peft_model = get_peft_model(make_ranker(tokenizer), LoraConfig(r=2, lora_alpha=4, target_modules=PINFM_LORA_TARGET_MODULES, init_lora_weights=False))
    encoded = PinFMCandidateScorer(make_ranker(tokenizer), tokenizer).encode(make_history(8), ["m1", "m2", "m3"])
    with torch.no_grad():
        expected = peft_model.eval().base_model.model.score_candidates(
            input_ids=encoded.input_ids[None], action_ids=encoded.action_ids[None], timestamps=encoded.timestamps[None],
            candidate_ids=encoded.candidate_ids[None], request_timestamps=torch.tensor([encoded.request_time]),
        )[0]
        without_lora = make_ranker(tokenizer).score_candidates(
            input_ids=encoded.input_ids[None], action_ids=encoded.action_ids[None], timestamps=encoded.timestamps[None],
            candidate_ids=encoded.candidate_ids[None], request_timestamps=torch.tensor([encoded.request_time]),
        )[0]
    assert not torch.allclose(expected, without_lora, atol=1e-4)
    scorer = PinFMCandidateScorer(peft_model, tokenizer)
    assert isinstance(scorer.model, PinFMForCTR)
    torch.testing.assert_close(scorer.score_encoded([encoded])[0], expected, atol=1e-5, rtol=1e-5)


def test_rankers_the_request_cannot_feed_are_refused():
    tokenizer = make_tokenizer()
    with pytest.raises(ValueError, match="side features"):
        PinFMCandidateScorer(make_ranker(tokenizer, ctr_feature_vocab_size=5, ctr_feature_slots=[1]), tokenizer)
    with pytest.raises(ValueError, match="item tokens"):
        PinFMCandidateScorer(make_ranker(make_tokenizer()), PinFMTokenizer(items=["a"], actions=ACTIONS))


def test_micro_batcher_scores_concurrent_requests_together_and_in_order():
    seen = []

    def score_batch(requests):
        seen.append(list(requests))
        if "boom" in requests:
            raise RuntimeError("scoring failed")
        return [r * 10 for r in requests]

    async def scenario():
        batcher = PinFMMicroBatcher(score_batch, max_batch_size=4, max_wait_ms=200)
        await batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
            with pytest.raises(RuntimeError, match="scoring failed"):
                await batcher.submit("boom")
            after = await batcher.submit(7)  # a failed batch does not stop the worker
        finally:
            await batcher.stop()
        return first, after, batcher.batch_sizes

    first, after, sizes = asyncio.run(scenario())
    assert first == [0, 10, 20, 30, 40, 50] and after == 70
    assert sizes[:2] == [4, 2] and seen[0] == [0, 1, 2, 3]


EXPORT_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pinfm_hf", "transformers", "peft"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)")

    sys.meta_path.insert(0, Block())
    for name in ("pinfm_hf", "transformers"):
        try:
            __import__(name)
            raise SystemExit(f"{name} should not be importable here")
        except ModuleNotFoundError:
            pass
    import torch

    program, inputs, output, kind = sys.argv[1:5]
    load = torch._inductor.aoti_load_package if kind == "aoti" else lambda p: torch.export.load(p).module()
    scorer = load(program)
    with torch.no_grad():
        logits = [scorer(**example) for example in torch.load(inputs)]
    torch.save(logits, output)
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("pinfm_hf", "transformers", "peft"))))
    """
)


def check_exported_scorer_in_a_clean_process(program, model, tmp_path, kind: str) -> None:
    """The exported scorer, loaded in `python -I` with pinfm_hf/transformers/peft blocked, scores like the model."""
    examples = [
        export_example_inputs(model.config, num_users=3, num_events=11, num_candidates=7),
        export_example_inputs(model.config, num_users=1, num_events=1, num_candidates=1),  # the smallest request
        export_example_inputs(model.config, num_users=1, num_events=15, num_candidates=40),
    ]
    with torch.no_grad():
        expected = [PinFMScoringModule(model)(**example) for example in examples]
    torch.save(examples, tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-I", "-c", EXPORT_CHILD, str(program), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), kind],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # nothing of them was imported
    for got, want in zip(torch.load(tmp_path / "out.pt"), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_exported_scorer_runs_without_pinfm_hf_and_transformers(tmp_path):
    tokenizer = make_tokenizer()
    model = make_ranker(tokenizer, ctr_fusion="late")
    program = export_scorer(model, tmp_path / "scorer.pt2")
    with torch.no_grad():
        direct = model.score_candidates(**export_example_inputs(model.config))
    torch.testing.assert_close(load_exported_scorer(program)(**export_example_inputs(model.config)), direct, atol=1e-5, rtol=1e-5)
    check_exported_scorer_in_a_clean_process(program, model, tmp_path, "export")
    spec = json.loads(exported_spec(program))
    assert spec["inputs"] == EXPORTED_INPUTS and spec["max_history"] == 15


def exported_spec(program) -> str:
    """The `pinfm_scorer.json` written into a `torch.export` archive."""
    extra = {"pinfm_scorer.json": ""}
    torch.export.load(str(program), extra_files=extra)
    return extra["pinfm_scorer.json"]


@pytest.mark.slow
def test_compiled_scorer_runs_without_pinfm_hf_and_transformers(tmp_path):
    """AOTInductor (about 40 s of C++ builds): int8 item table, item bias; the serving scorer takes it too."""
    tokenizer = make_tokenizer()
    model = make_ranker(tokenizer, num_hidden_layers=1).quantize_item_embeddings("int8")
    scorer = PinFMCandidateScorer(model, tokenizer, compile=True, compiled_path=tmp_path / "scorer_aoti.pt2")
    encoded = scorer.encode(make_history(7), ["m1", "fresh", "m30"])
    torch.testing.assert_close(scorer.score_encoded([encoded])[0], naive_logits(model, encoded), atol=1e-4, rtol=1e-4)
    check_exported_scorer_in_a_clean_process(tmp_path / "scorer_aoti.pt2", model, tmp_path, "aoti")


def test_tune_allocator_applies_on_glibc():
    assert tune_allocator() is True
