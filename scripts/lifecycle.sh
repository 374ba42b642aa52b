#!/usr/bin/env bash
# The README's life cycle end to end on real ML-1M with tiny configs (a few minutes on 2 cores), against a loopback
# hub on 127.0.0.1 (tests/hub_server.py; no account, nothing leaves the machine):
#   pretrain -> push -> load elsewhere by repo id (recommend) -> fine-tune a use-case adapter from the repo id
#   -> push the adapter -> score candidates with base + adapter pulled from the hub.
# On a real hub: the same commands without the loopback server, with HF_TOKEN set and your own repo ids.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
WORK=${WORK:-outputs/lifecycle}
PORT=${PORT:-8765}
BASE_REPO=demo/pinfm-ml1m-tiny
ADAPTER_REPO=demo/pinfm-ml1m-tiny-like
rm -rf "$WORK" && mkdir -p "$WORK"

"$PY" tests/hub_server.py --port "$PORT" --storage "$WORK/hub" > "$WORK/hub.log" 2>&1 &
HUB_PID=$!
trap 'kill $HUB_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q HF_ENDPOINT "$WORK/hub.log" 2>/dev/null && break; sleep 0.1; done
export HF_ENDPOINT="http://127.0.0.1:$PORT" HF_TOKEN=hf_loopback_test_token HF_HOME="$WORK/hf_home"
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

echo "== 1-2. pretrain a base (events before the CTR time cut) and push it to $BASE_REPO"
"$PY" recipes/pretrain.py --config recipes/configs/tiny_test.yaml --time_cut_quantile 0.9 --output_dir "$WORK/base" \
    --push_to_hub true --hub_model_id "$BASE_REPO"

echo "== 3. elsewhere: load it by repo id and recommend from a raw history"
"$PY" - "$BASE_REPO" <<'PY'
import sys
from transformers import AutoModel, pipeline

repo = sys.argv[1]
encoder = AutoModel.from_pretrained(repo, trust_remote_code=True)
recommend = pipeline(model=repo, trust_remote_code=True)
history = [
    {"item_id": "Toy Story (1995)", "action": "rating_5", "timestamp": 978300760},
    {"item_id": "Aladdin (1992)", "action": "rating_4", "timestamp": 978302109},
    {"item_id": "Lion King, The (1994)", "action": "rating_5", "timestamp": 978301968},
]
print(f"{repo}: {type(encoder).__name__}, {sum(p.numel() for p in encoder.parameters()):,} parameters")
for rec in recommend(history, top_k=5):
    print(f"  {rec['score']:7.3f}  {rec['item_id']}")
PY

echo "== 4-5. fine-tune the 'like' use case as a LoRA adapter on $BASE_REPO and push it to $ADAPTER_REPO"
"$PY" recipes/finetune_ctr.py --config recipes/configs/ctr_tiny_test.yaml --base "$BASE_REPO" --transfer lora \
    --output_dir "$WORK/like" --push_to_hub true --hub_model_id "$ADAPTER_REPO"

echo "== 6. score real candidates with base + adapter pulled from the hub"
"$PY" recipes/score_candidates.py --base "$BASE_REPO" --adapter "$ADAPTER_REPO" --use_case like --max_history 20 --num_users 2
echo "Hub requests: $WORK/hub.log"
