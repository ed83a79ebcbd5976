# The benchmark loop both engines' benchmark.sh share: prompts -> `vllm bench serve` against
# the baseline and the EAGLE-3 server at each concurrency -> compare.py's table and plot.
# An engine sets ENGINE, BACKEND and may define after_run LABEL URL RESULT_STEM.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DATASET="${DATASET:-sharegpt}" SHAREGPT_TEST="${SHAREGPT_TEST:-$REPO_DIR/outputs/demo-default/data/test.jsonl}"
MT_BENCH="${MT_BENCH:-$REPO_DIR/data/mt_bench/question.jsonl}" CONCURRENCY="${CONCURRENCY:-1}"
NUM_PROMPTS="${NUM_PROMPTS:-80}" OUTPUT_LEN="${OUTPUT_LEN:-256}" TARGET="${TARGET:-}"
SERVED_NAME="${SERVED_NAME:-target}" HOST="${HOST:-127.0.0.1}"
BASELINE_URL="${BASELINE_URL:-http://$HOST:8000}" EAGLE_URL="${EAGLE_URL:-http://$HOST:8001}"
RESULT_DIR="${RESULT_DIR:-$REPO_DIR/outputs/benchmark}" ONLY="${ONLY:-baseline eagle3}" ROUNDS="${ROUNDS:-1}"
DRY=0 EXTRA=()

bench_usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOT

flags ([environment variable] = default):
  --dataset D           [DATASET] sharegpt (the held-out split, [SHAREGPT_TEST] =
                        outputs/demo-default/data/test.jsonl) | mt-bench ([MT_BENCH] =
                        data/mt_bench/question.jsonl, FastChat's) | any chat JSON/JSONL = sharegpt
  --concurrency "1 4"   [CONCURRENCY] levels, each run for both servers = 1
  --num-prompts N       [NUM_PROMPTS] = 80
  --output-len N        [OUTPUT_LEN] tokens per answer = 256
  --target DIR|NAME     [TARGET] tokenizer = the embedded default
  --served-name NAME    [SERVED_NAME] = target
  --baseline-url URL    [BASELINE_URL] = http://127.0.0.1:8000
  --eagle-url URL       [EAGLE_URL] = http://127.0.0.1:8001
  --only "baseline"     [ONLY] which servers = "baseline eagle3"
  --rounds R            [ROUNDS] = 1: split the prompts into R parts, served in turn, each by
                        both servers, the order flipping every round (baseline first, then
                        EAGLE-3 first, ...): a drift of the machine's speed falls on both alike
  --result-dir D        [RESULT_DIR] = outputs/benchmark
  --dry-run             print the commands, run nothing
  -- ARGS               passed to vllm bench serve
Greedy (temperature 0), prompts in file order; results: RESULT_DIR/$ENGINE-{baseline,eagle3}-c{N}.json
(-c{N}-r{i}.json with rounds) and vllm bench's output in .log files next to them, then
compare.{md,json,png} from benchmark/compare.py.
EOT
}

bench_main() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY=1; shift; continue ;;
      -h|--help) bench_usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
    esac
    [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
    case "$1" in
      --dataset) DATASET="$2" ;;             --concurrency) CONCURRENCY="$2" ;;
      --num-prompts) NUM_PROMPTS="$2" ;;     --output-len) OUTPUT_LEN="$2" ;;
      --target) TARGET="$2" ;;               --served-name) SERVED_NAME="$2" ;;
      --baseline-url) BASELINE_URL="$2" ;;   --eagle-url) EAGLE_URL="$2" ;;
      --only) ONLY="$2" ;;                   --result-dir) RESULT_DIR="$2" ;;
      --rounds) ROUNDS="$2" ;;
      *) die "unknown flag $1 (see --help)" ;;
    esac
    shift 2
  done
  case "$DATASET" in
    sharegpt) DATASET="$SHAREGPT_TEST" ;;
    mt-bench) DATASET="$MT_BENCH" ;;
  esac
  [[ $DRY == 1 || -f "$DATASET" ]] || die "no prompt file $DATASET"
  [[ "$ROUNDS" =~ ^[1-9][0-9]*$ && "$NUM_PROMPTS" =~ ^[0-9]+$ && $ROUNDS -le $NUM_PROMPTS ]] ||
    die "--rounds must be a whole number from 1 to --num-prompts ($NUM_PROMPTS), not '$ROUNDS'"
  [[ -n "$TARGET" ]] || TARGET="$(default_target)"
  vllm_launcher
  BENCH=("${VLLM[@]}" bench serve)
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
  mkdir -p "$RESULT_DIR"
  local prompts="$RESULT_DIR/prompts.jsonl" c r n order file suffix label url stem log
  local cmd=("$PYTHON" -m benchmark.prompts "$DATASET" "$prompts" --limit "$NUM_PROMPTS" --rounds "$ROUNDS")
  if [[ $DRY == 1 ]]; then quoted "${cmd[@]}"; else need_project_python; "${cmd[@]}"; fi
  for c in $CONCURRENCY; do
    if [[ $DRY == 0 ]]; then  # an earlier run's results at this level (other rounds) would be merged in
      for label in $ONLY; do
        stem="$RESULT_DIR/$ENGINE-$label-c$c"; rm -f "$stem.json" "$stem.server_info.json" "$stem"-r[0-9]*.json
      done
    fi
    for r in $(seq "$ROUNDS"); do
      order="$ONLY" file="$prompts" n="$NUM_PROMPTS" suffix=""
      if (( ROUNDS > 1 )); then  # round r holds prompts r, r + R, ... (benchmark.prompts)
        file="${prompts%.jsonl}-r$r.jsonl" n=$(( (NUM_PROMPTS - r + ROUNDS) / ROUNDS )) suffix="-r$r"
        if (( r % 2 == 0 )); then order=""; for label in $ONLY; do order="$label $order"; done; fi
      fi
      for label in $order; do
        url="$([[ $label == eagle3 ]] && echo "$EAGLE_URL" || echo "$BASELINE_URL")"
        stem="$ENGINE-$label-c$c$suffix"
        cmd=("${BENCH[@]}" --backend "$BACKEND" --base-url "$url" --model "$SERVED_NAME" --tokenizer "$TARGET"
             --dataset-name custom --dataset-path "$file" --custom-output-len "$OUTPUT_LEN"
             --num-prompts "$n" --max-concurrency "$c" --temperature 0 --disable-shuffle
             --save-result --result-dir "$RESULT_DIR" --result-filename "$stem.json" --label "$stem" "${EXTRA[@]}")
        if [[ $DRY == 1 ]]; then quoted "${cmd[@]}"; continue; fi
        # vllm bench's own output (progress, its table, and the nanobind leak report its exit
        # prints, hundreds of lines) goes to a log; compare.py's table is the summary
        log="$RESULT_DIR/$stem.log"
        echo "== $stem: $url (output: $log)"
        "${cmd[@]}" > "$log" 2>&1 || { echo "error: vllm bench serve failed; the end of $log:" >&2
          grep -v -e '^nanobind: ' -e '^ - leaked ' "$log" | tail -n 20 >&2; exit 1; }
        if declare -F after_run >/dev/null; then after_run "$label" "$url" "$RESULT_DIR/$stem"; fi
      done
    done
  done
  cmd=("$PYTHON" "$BENCH_DIR/compare.py" "$RESULT_DIR")
  if [[ $DRY == 1 ]]; then quoted "${cmd[@]}"; else "${cmd[@]}"; fi
}
