#!/usr/bin/env bash
# Set-up, then the main job end to end on real data: pretrain PinFM on MovieLens-1M from ../shared/data (about
# 5 minutes on 2 CPU cores), evaluate full-ranking HR/NDCG, save a model that AutoModel loads, reload it, and print
# where the model, card and plot are. Extra args go to recipes/pretrain.py, e.g.
#   bash scripts/demo.sh --dataset taobao --data_dir /path/to/data            # the Taobao sample
#   bash scripts/demo.sh --dataset my_events.csv --columns '{"user_id": "uid", "item_id": "iid", "action": "event", "timestamp": "ts"}'
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUTPUT_DIR=${OUTPUT_DIR:-outputs/demo-ml1m}
# The published-comparison config, full softmax included (~0.5 s per step here), for 3 of its 30 epochs, so that the
# whole command takes about 5 minutes (RESULTS.md has the longer runs).
.venv/bin/python recipes/pretrain.py --config recipes/configs/ml1m_pinfm_small.yaml --num_train_epochs 3 \
    --output_dir "$OUTPUT_DIR" "$@"
.venv/bin/python - "$OUTPUT_DIR" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoModel, AutoTokenizer

import pinfm_hf  # noqa: F401  registers the Auto classes, so no trust_remote_code is needed

out = Path(sys.argv[1])
model = AutoModel.from_pretrained(out / "model")
tokenizer = AutoTokenizer.from_pretrained(out / "model")
results = json.loads((out / "results.json").read_text())
test = results["test"]
print("\n== pinfm-hf demo ==")
print(f"reloaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters) and "
      f"{type(tokenizer).__name__} ({len(tokenizer):,} item tokens) through the Auto classes")
protocol = "items of the history excluded, as HSTU" if results.get("eval_exclude_history") else "every item"
print(f"test ({test['num_users']} users, full ranking, {protocol}): " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "num_users"))
print(f"trained {results['steps']} steps in {results['train_seconds']} s, {results['tokens_per_s']:,.0f} tokens/s, peak RSS {results['peak_rss_gib']} GiB")
print(f"model + tokenizer: {out / 'model'}\nmodel card:        {out / 'model' / 'README.md'}\ncurves:            {out / 'training_curves.png'}\nlog:               {out / 'train_log.jsonl'}")
PY
