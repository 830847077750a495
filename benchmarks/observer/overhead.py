"""Observer overhead: (observed pass time) / (plain forward time) over the same tokens.

Target: at most 1.3. One plain forward is the floor; an observer that ran every
expert on every token would cost about E/k.

    python -m benchmarks.observer.overhead [--model DIR] [--json-out FILE]

Without --model it builds a seeded random Qwen3-MoE of fixture-like shape (cost needs no
training). Times are the median of several repeats, in-memory model, whole-model mode, and
also the layer-at-a-time mode against a plain layer-at-a-time pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moecompress.engine.layers import LayerEngine
from moecompress.calibration.observer import DEFAULT_STATISTICS, Observer
from moecompress.models.adapters import get_adapter


def synthetic_model(seed: int = 0) -> torch.nn.Module:
    """A random Qwen3-MoE: 4 layers, hidden 256, 32 experts (width 128), top-4."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=32,
                            num_experts_per_tok=4, vocab_size=4096, norm_topk_prob=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int = 5) -> dict:
    """Plain vs observed times for whole-model and layer-at-a-time passes."""
    adapter = get_adapter(model)
    domains = ["all"]

    @torch.no_grad()
    def plain_whole():
        for ids in batches:
            model(input_ids=ids, use_cache=False)

    @torch.no_grad()
    def observed_whole():
        observer = Observer(model, adapter, domains, DEFAULT_STATISTICS)
        with observer.active():
            for ids in batches:
                model(input_ids=ids, use_cache=False)

    def layerwise(observe: bool):
        def run():
            runner = LayerEngine(model, adapter)
            runner.prepare([("all", ids) for ids in batches])
            observer = Observer(model, adapter, domains, DEFAULT_STATISTICS) if observe else None
            moe = {ref.index for ref in adapter.moe_layers(model)}
            for index in range(len(runner.layers)):
                if observe and index in moe:
                    with observer.active(layers=[index]):
                        runner.run_layer(index)
                else:
                    runner.run_layer(index)
        return run

    plain = _median_time(plain_whole, repeats)
    observed = _median_time(observed_whole, repeats)
    plain_lw = _median_time(layerwise(False), repeats)
    observed_lw = _median_time(layerwise(True), repeats)
    tokens = sum(ids.numel() for ids in batches)
    return {
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "plain_forward_s": plain,
        "observed_forward_s": observed,
        "overhead_whole_model": observed / plain,
        "plain_layerwise_s": plain_lw,
        "observed_layerwise_s": observed_lw,
        "overhead_layerwise": observed_lw / plain_lw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: synthetic model)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        model = synthetic_model()
        name = "synthetic qwen3_moe (4 layers, hidden 256, 32 experts, top-4)"
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = str(args.model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen) for _ in range(args.batches)]
    result = {"model": name, **measure(model, batches, args.repeats)}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
