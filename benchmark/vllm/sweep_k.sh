#!/usr/bin/env bash
# Serve the EAGLE-3 draft with k = 1..5 guesses in turn, each benchmarked against the plain
# server (benchmark.sh: the same prompts on both, in parts served in turn): the measured side
# of traineagle3.advise's prediction.
#
#   bash benchmark/vllm/serve.sh        # the plain server, :8000
#   bash benchmark/vllm/sweep_k.sh [--ks "1 2 3 4 5"] [--out DIR] [benchmark.sh flags, e.g. --repeats 2]
#   python -m benchmark.advice_check advise.json DIR
#
# The EAGLE-3 server of each k (serve.sh --eagle --num-speculative-tokens k; its other settings
# from the environment as serve.sh reads them: DRAFT, TARGET, DTYPE, SERVED_NAME, PORT, ...) is
# stopped after its benchmark; DIR/k<k>/ holds benchmark.sh's results (= outputs/sweep_k).
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
KS="1 2 3 4 5" OUT="$REPO_DIR/outputs/sweep_k" REST=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ks) KS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) REST+=("$1"); shift ;;
  esac
done
for k in $KS; do [[ "$k" =~ ^[1-9][0-9]*$ ]] || die "--ks takes whole numbers >= 1, like \"1 2 3\", not '$KS'"; done
here="$(dirname "${BASH_SOURCE[0]}")"
trap 'bash "$here/serve.sh" --eagle --stop >/dev/null' EXIT
for k in $KS; do
  echo "== k=$k"
  bash "$here/serve.sh" --eagle --num-speculative-tokens "$k"
  bash "$here/benchmark.sh" --result-dir "$OUT/k$k" "${REST[@]}"
  bash "$here/serve.sh" --eagle --stop
done
