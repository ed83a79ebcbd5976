#!/usr/bin/env bash
# Serve the target with SGLang, plain (port 8000) or with an EAGLE-3 draft (-e/--eagle, port 8001).
#
#   bash benchmark/sglang/serve.sh [-e|--eagle] [--target DIR] [--draft DIR] [--runtime bare|singularity|docker]
#   bash benchmark/sglang/serve.sh [-e] --stop
#
# Every setting is a flag or an environment variable (the flag wins); --help lists them.
# The server runs in the background; the script returns once /health answers and prints
# where the log is.  --dry-run only prints the command.  SGLang needs a GPU for EAGLE-3.
# The default drafting is a chain (topk 1) of 3 steps, the same work as vLLM's k=3; a
# tree, e.g. --num-steps 5 --eagle-topk 8 --num-draft-tokens 32, is often faster at batch 1.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

DRAFT="${DRAFT:-$REPO_DIR/outputs/demo-default/exported/sglang}" NUM_STEPS="${NUM_STEPS:-3}"
EAGLE_TOPK="${EAGLE_TOPK:-1}" NUM_DRAFT_TOKENS="${NUM_DRAFT_TOKENS:-4}"
MEM_FRACTION_STATIC="${MEM_FRACTION_STATIC:-}" MAX_TOTAL_TOKENS="${MAX_TOTAL_TOKENS:-}"
CUDA_GRAPH_MAX_BS="${CUDA_GRAPH_MAX_BS:-}"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOT

flags ([environment variable] = default):
$COMMON_FLAGS
  --draft DIR                  [DRAFT] = outputs/demo-default/exported/sglang
  --num-steps N                [NUM_STEPS] --speculative-num-steps = 3
  --eagle-topk K               [EAGLE_TOPK] --speculative-eagle-topk = 1
  --num-draft-tokens N         [NUM_DRAFT_TOKENS] --speculative-num-draft-tokens = 4
  --mem-fraction-static F      [MEM_FRACTION_STATIC] = SGLang's
  --max-total-tokens N         [MAX_TOTAL_TOKENS] = SGLang's
  --cuda-graph-max-bs N        [CUDA_GRAPH_MAX_BS] --cuda-graph-max-bs-decode = SGLang's
EOT
}

engine_flag() {
  case "$1" in
    --draft) DRAFT="$2" ;;                    --num-steps) NUM_STEPS="$2" ;;
    --eagle-topk) EAGLE_TOPK="$2" ;;          --num-draft-tokens) NUM_DRAFT_TOKENS="$2" ;;
    --mem-fraction-static) MEM_FRACTION_STATIC="$2" ;;
    --max-total-tokens) MAX_TOTAL_TOKENS="$2" ;;
    --cuda-graph-max-bs) CUDA_GRAPH_MAX_BS="$2" ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
[[ $STOP == 1 ]] && { serve sglang; exit 0; }
[[ -n "$TARGET" ]] || TARGET="$(default_target)"

CMD=(python3 -m sglang.launch_server --model-path "$TARGET" --served-model-name "$SERVED_NAME" --host "$HOST"
     --port "$PORT" --dtype "$DTYPE" --tp-size "$TP" --context-length "$MAX_MODEL_LEN")
[[ -n "$ATTENTION_BACKEND" ]] && CMD+=(--attention-backend "$ATTENTION_BACKEND")
[[ -n "$MEM_FRACTION_STATIC" ]] && CMD+=(--mem-fraction-static "$MEM_FRACTION_STATIC")
[[ -n "$MAX_TOTAL_TOKENS" ]] && CMD+=(--max-total-tokens "$MAX_TOTAL_TOKENS")
[[ -n "$CUDA_GRAPH_MAX_BS" ]] && CMD+=(--cuda-graph-max-bs-decode "$CUDA_GRAPH_MAX_BS")
if [[ $EAGLE == 1 ]]; then
  [[ $DRY == 1 || -f "$DRAFT/config.json" ]] || die "no EAGLE-3 draft at $DRAFT (export one: python -m traineagle3.export --engine sglang ...)"
  CMD+=(--speculative-algorithm EAGLE3 --speculative-draft-model-path "$DRAFT" --speculative-num-steps "$NUM_STEPS"
        --speculative-eagle-topk "$EAGLE_TOPK" --speculative-num-draft-tokens "$NUM_DRAFT_TOKENS")
fi
serve sglang "${CMD[@]}"
