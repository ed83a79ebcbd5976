"""Run SGLang's own argument parser and config readers on serve.sh command lines, on a CPU.

    python tests/sglang_probe.py LINES.json RESULTS.json    (LINES: a JSON list of argv lists)

Meant for tests/test_sglang_args.py, which runs it in a subprocess with PYTHONPATH=.venv/sglang:
`make setup` installs there, with --no-deps, the SGLang that sglang.def's image has and the
transformers it pins (5.12.1, which SGLang's config classes need; the project's own is newer).
Keeping it out of the test process keeps that transformers out of every other test.

torchvision is the one thing replaced: PyPI has only its CUDA build, which does not import
with torch+cpu ("operator torchvision::nms does not exist"), and SGLang imports it at module
level for image decoding and transforms that parsing and config reading never call.  A stand-in
module answers those imports; anything taken from it is an inert placeholder.

Per line: argparse with SGLang's own `ServerArgs.add_cli_args` (unknown flags, types, choices),
the deprecated aliases among the flags used, then `ServerArgs.from_cli_args` with `--device cpu`
added, which runs SGLang's whole `__post_init__` resolution on the CPU platform (without it
SGLang stops at "No accelerator ... is available").  For an EAGLE-3 line, also what the server
would make of the draft: SGLang's own model registry, aux-state resolution and the target
model's `set_eagle3_layers_to_capture`.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert


class Inert(metaclass=_Placeholder):
    """Whatever SGLang takes from torchvision at import time: subclassable, callable, inert."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Inert()

    def __getattr__(self, name):
        return Inert()


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Inert


class TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import torchvision[.x]` with _StandInModule.  It claims 0.28.0 (the release for
    torch 2.13.0): transformers 5.12.1 refuses to register the image processors SGLang's config
    modules register at import ("AutoImageProcessor requires the Torchvision library")."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True, origin="stand-in")
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        module.__path__, module.__file__, module.__version__ = [], "stand-in", "0.28.0"


class Rejected(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """SGLang's parser, raising instead of exiting so each line gets its own verdict."""

    def error(self, message):
        raise Rejected(message)


SERVER_FIELDS = (
    "model_path",
    "served_model_name",
    "host",
    "port",
    "dtype",
    "tp_size",
    "context_length",
    "attention_backend",
    "mem_fraction_static",
    "max_total_tokens",
    "cuda_graph_max_bs_decode",
    "device",
    "speculative_algorithm",
    "speculative_draft_model_path",
    "speculative_num_steps",
    "speculative_eagle_topk",
    "speculative_num_draft_tokens",
)


def eagle3_reading(server_args) -> dict:
    """The draft as an EAGLE-3 server built from `server_args` reads it, before any weights load."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner_components.spec_aux_hidden_state import (
        resolve_spec_aux_hidden_state_config,
    )
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.speculative.eagle_utils import get_draft_input_from_target_hidden_dim
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string(server_args.speculative_algorithm)
    target = ModelConfig.from_server_args(server_args)
    draft = ModelConfig.from_server_args(
        server_args,
        model_path=server_args.speculative_draft_model_path,
        model_revision=server_args.speculative_draft_model_revision,
        is_draft_model=True,
    )
    aux = resolve_spec_aux_hidden_state_config(
        server_args=server_args, model_config=target, spec_algorithm=algo, is_draft_worker=False
    )
    target_cls, _ = ModelRegistry.resolve_model_cls(target.hf_config.architectures)
    draft_cls, _ = ModelRegistry.resolve_model_cls(draft.hf_config.architectures)
    # The target model's own method, on a stand-in for the model it would be called on
    # (building the model needs torch.distributed and GPU kernels).
    model = types.SimpleNamespace(
        pp_group=types.SimpleNamespace(is_last_rank=True),
        config=target.hf_config,
        model=types.SimpleNamespace(),
        capture_aux_hidden_states=False,
    )
    target_cls.set_eagle3_layers_to_capture(model, aux.eagle_aux_hidden_state_layer_ids)
    runner = types.SimpleNamespace(model_config=draft, spec_algorithm=algo)
    return {
        "is_eagle3": algo.is_eagle3(),
        "target_class": target_cls.__name__,
        "draft_class": draft_cls.__name__,
        "draft_dtype": str(draft.dtype).removeprefix("torch."),
        "draft_num_layers": aux.eagle_draft_num_layers,
        "use_aux_hidden_state": aux.eagle_use_aux_hidden_state,
        "aux_layer_ids": aux.eagle_aux_hidden_state_layer_ids,
        "target_num_layers": target.num_hidden_layers,
        "captures_aux": model.capture_aux_hidden_states,
        "captured_layer_inputs": model.model.layers_to_capture,
        "fc_in_features": get_draft_input_from_target_hidden_dim(runner),
    }


def probe(argv: list[str]) -> dict:
    from sglang.srt.arg_groups import argparse_actions as actions
    from sglang.srt.server_args import ServerArgs

    deprecated = (
        actions.DeprecatedAction,
        actions.DeprecatedStoreTrueAction,
        actions.DeprecatedStoreConstAction,
        actions.DeprecatedAliasStoreAction,
    )
    args = argv[argv.index("sglang.launch_server") + 1 :]
    parser = Parser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    out = {
        "args": args,
        "error": None,
        "deprecated": [a for a in args if isinstance(parser._option_string_actions.get(a), deprecated)],
    }
    try:
        server_args = ServerArgs.from_cli_args(parser.parse_args([*args, "--device", "cpu"]))
        out["server_args"] = {k: getattr(server_args, k) for k in SERVER_FIELDS}
        if server_args.speculative_algorithm is not None:
            out["eagle3"] = eagle3_reading(server_args)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    sys.meta_path.insert(0, TorchvisionStandIn())
    lines_file, results_file = sys.argv[1:]
    with open(lines_file) as f:
        lines = json.load(f)
    with open(results_file, "w") as f:
        json.dump([probe(argv) for argv in lines], f)


if __name__ == "__main__":
    main()
