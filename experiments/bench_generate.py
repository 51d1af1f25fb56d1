"""Generation speed (issue 22): ``attnjax.inference.generate`` (the decode cache) against
``generate_by_recomputing`` (a full forward over the sequence for every new token), on a small LM.

The model is ``experiments.lib.model.LanguageModel`` (softmax ``MultiHeadAttention`` blocks with RoPE and an MLP,
random weights; weights do not change the cost). For each batch size, in one run, interleaved round by round:

- end to end, greedy: ``generate(model, prompt [B, P], N)`` (the ``P`` prompt tokens cached by one
  ``model.prefill`` pass, then ``N`` new tokens) against ``generate_by_recomputing(model, prompt, N)``
  (``N`` forwards over ``P + N`` positions); new tokens/s = ``B · N / time``;
- one step at context ``P``: ``model.decode`` of one token against a cache holding ``P`` tokens, against
  ``model(tokens [B, P + N])``, the forward each recomputing step runs; tokens/s = ``B / time``.

    python -m experiments.bench_generate            # d_model 128, 2 layers, 4 heads, P = 1000, N = 24, B = 1, 8
    python -m experiments.bench_generate --smoke
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.inference import generate, generate_by_recomputing
from experiments.lib import cli, host, report
from experiments.lib.measure import time_thunks
from experiments.lib.model import LanguageModel, ModelConfig

SMOKE = {"prompt_len": 16, "new_tokens": 4, "batches": [1, 2], "d_model": 16, "num_heads": 2, "vocab": 32,
         "repeats": 1, "max_seconds": 1.0}
"""``--smoke`` defaults: tiny sizes that check the benchmark runs, in seconds (explicit flags still win)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=1000, help="prompt tokens P")
    p.add_argument("--new-tokens", type=int, default=24, help="generated tokens N")
    p.add_argument("--batches", type=cli.parse_ints, default=[1, 8], help="batch sizes")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="the interleaved rounds stop once they pass this many seconds (at least one round)")
    cli.add_output_flags(p, "bench_generate")
    return cli.parse_with_smoke(p, argv, SMOKE)


@nnx.jit(static_argnames="max_len")
def _prefilled_cache(model, tokens, max_len):
    return model.prefill(tokens, model.init_cache(tokens.shape[0], max_len))[1]


def thunks(model: LanguageModel, batch: int, args: argparse.Namespace) -> dict:
    """The four timed programs at batch ``batch``, each a zero-argument function (inputs made here). The two
    single steps are compiled executables over the split model (no ``nnx.jit`` graph traversal per call, which
    costs about as much as a small step)."""
    total = args.prompt_len + args.new_tokens
    tokens = jax.random.randint(jax.random.key(batch), (batch, total), 0, args.vocab)
    prompt = tokens[:, :args.prompt_len]
    cache = _prefilled_cache(model, prompt, total)
    token = tokens[:, args.prompt_len:args.prompt_len + 1]
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, token, cache: nnx.merge(graphdef, state).decode(token, cache)[0]).lower(
        state, token, cache).compile()
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)).lower(state, tokens).compile()
    return {("generate", batch): lambda: generate(model, prompt, args.new_tokens),
            ("recompute", batch): lambda: generate_by_recomputing(model, prompt, args.new_tokens),
            ("decode_step", batch): lambda: step(state, token, cache),
            ("forward", batch): lambda: forward(state, tokens)}


def run(args: argparse.Namespace) -> dict:
    """Every program at every batch size, interleaved; rows, tokens/s and the cache speedups."""
    config = ModelConfig(args.vocab, "softmax", d_model=args.d_model, num_layers=args.num_layers,
                         num_heads=args.num_heads)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    load_before = host.machine_load()
    programs = {key: fn for batch in args.batches for key, fn in thunks(model, batch, args).items()}
    timings = time_thunks(programs, repeats=args.repeats, warmup=1, max_seconds=args.max_seconds)
    rows = []
    for (path, batch), t in timings.items():
        tokens = batch * args.new_tokens if path in ("generate", "recompute") else batch
        rows.append({"path": path, "batch": batch, "median_s": t.median_s, "repeats": t.repeats,
                     "new_tokens_per_s": tokens / t.median_s})
    speedup = {}
    for batch in args.batches:
        speedup[f"end_to_end_B{batch}"] = timings[("recompute", batch)].median_s / timings[("generate", batch)].median_s
        speedup[f"per_step_B{batch}"] = timings[("forward", batch)].median_s / timings[("decode_step", batch)].median_s
    greedy_equal = {str(b): bool(jnp.array_equal(*(f(model, p, args.new_tokens) for f in (generate,
                                                                                          generate_by_recomputing))))
                    for b in args.batches
                    for p in [jax.random.randint(jax.random.key(b), (b, args.prompt_len), 0, args.vocab)]}
    return {"config": {"d_model": args.d_model, "num_layers": args.num_layers, "num_heads": args.num_heads,
                       "vocab": args.vocab, "mlp_ratio": config.mlp_ratio, "prompt_len": args.prompt_len,
                       "new_tokens": args.new_tokens},
            "rows": rows, "speedup": speedup, "greedy_tokens_equal": greedy_equal,
            "load_before": load_before, "load_after": host.machine_load(), "device": host.device_info(),
            "cpu": host.cpu_model(), "args": report.jsonable_args(args)}


def markdown(res: dict, args: argparse.Namespace) -> str:
    """The results file: setup, the end-to-end and per-step tables, the speedups."""
    def row(path, batch):
        return next(r for r in res["rows"] if (r["path"], r["batch"]) == (path, batch))

    def cell(path, batch):
        r = row(path, batch)
        return f"{r['median_s'] * 1e3:.1f} ms ({r['new_tokens_per_s']:.0f} tok/s, n={r['repeats']})"

    c = res["config"]
    end_to_end = report.markdown_table(
        ["B", "generate (cache)", "generate_by_recomputing", "speedup", "same greedy tokens"],
        [[b, cell("generate", b), cell("recompute", b), f"**{res['speedup'][f'end_to_end_B{b}']:.1f}x**",
          res["greedy_tokens_equal"][str(b)]] for b in args.batches])
    per_step = report.markdown_table(
        ["B", "model.decode (1 token, cache of P)", "model(tokens [B, P + N])", "speedup"],
        [[b, cell("decode_step", b), cell("forward", b), f"**{res['speedup'][f'per_step_B{b}']:.1f}x**"]
         for b in args.batches])
    return "\n".join([
        f"# Generation with the decode cache vs recomputing the prefix ({res['device']['platform']})",
        "",
        f"`LanguageModel(ModelConfig(vocab={c['vocab']}, mixer='softmax', d_model={c['d_model']}, "
        f"num_layers={c['num_layers']}, num_heads={c['num_heads']}))` (RoPE, MLP ratio {c['mlp_ratio']}, random "
        f"weights), float32, prompt P = {c['prompt_len']} tokens, N = {c['new_tokens']} new tokens (context "
        f"{c['prompt_len'] + c['new_tokens']}), greedy. `python -m experiments.bench_generate`; "
        f"{res['device']['device_kind']} ({res['cpu']}), jax {res['device']['jax_version']}. Medians of up to "
        f"{args.repeats} rounds after one warm-up, all programs interleaved round by round in one run.",
        "",
        host.load_note(res["load_before"], res["load_after"]),
        "",
        "## End to end: prompt in, N new tokens out",
        "",
        "`generate` caches the P prompt tokens with one `model.prefill` pass (one blocked attention call per "
        "layer), then decodes the N new tokens; `generate_by_recomputing` runs N forwards over the "
        f"{c['prompt_len'] + c['new_tokens']}-token buffer. tok/s counts new tokens, B · N per call.",
        "",
        end_to_end,
        "",
        f"## One step at context {c['prompt_len']}",
        "",
        "What each new token costs once the prompt is in: one `model.decode` against a cache holding P tokens "
        "(the cache is sized P + N, attention runs over all its slots with the unfilled ones masked), against "
        "the full forward a recomputing step runs. tok/s = B / step time.",
        "",
        per_step,
        "",
        "## Reading",
        "",
        reading(res, args),
        "",
    ])


def reading(res: dict, args: argparse.Namespace) -> str:
    """A paragraph on the target (cache ≥ 10x faster per new token than recomputing) and the end-to-end ratio."""
    c, sp = res["config"], res["speedup"]
    per_step = ", ".join(f"{sp[f'per_step_B{b}']:.1f}x at B = {b}" for b in args.batches)
    end = ", ".join(f"{sp[f'end_to_end_B{b}']:.1f}x at B = {b}" for b in args.batches)
    met = all(sp[f"per_step_B{b}"] >= 10 for b in args.batches)
    return (f"Per new token at context {c['prompt_len']} the cache is {per_step}: the target (at least 10x) is "
            f"{'met' if met else 'not met'}. End to end (one prefill pass, then {c['new_tokens']} decode steps, "
            f"against {c['new_tokens']} forwards over the whole buffer) the cache is {end}.")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run, write ``<out>/<name>.json`` and ``.md``, and return the results."""
    args = parse_args(argv)
    res = run(args)
    text = markdown(res, args)
    report.write_json(res, f"{args.name}.json", args.out)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
