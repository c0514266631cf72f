"""Which grammar library enforces JSON schemas cheapest on this CPU: llguidance, xgrammar, outlines-core.

For each library it measures, against a 49,152-token byte-level BPE tokenizer (SmolLM2's vocabulary
size, trained here on the Python standard library's sources because the Hub is not reachable):

- compile time of a JSON schema with ~10 fields, a nested object, an enum and an array (first request,
  nothing cached; for llguidance, which compiles lazily, up to and including the first mask);
- per-token cost of one decode step: computing the allowed-token mask and advancing by the sampled token,
  over the tokens of a valid instance of the schema (p50 and mean).

Run: ``python -m bench.grammar`` (libraries that are not installed are skipped). xgrammar and
outlines-core are not dependencies of the gateway: ``pip install --no-deps xgrammar apache-tvm-ffi
outlines-core`` to include them.
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.models import BENCH_DIR, VOCAB

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "notes": {"type": "string"},
    },
    "required": ["id", "name", "email", "age", "score", "active", "role", "tags", "address", "notes"],
    "additionalProperties": False,
}
INSTANCE = {
    "id": 4711,
    "name": "Ada Lovelace",
    "email": "ada@example.org",
    "age": 36,
    "score": 98.5,
    "active": True,
    "role": "editor",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "notes": "Wrote the first published algorithm for the Analytical Engine.",
}


def bench_tokenizer(root: Path = BENCH_DIR) -> Any:
    """A byte-level BPE tokenizer with SmolLM2's 49,152 tokens, trained once and cached."""
    from transformers import PreTrainedTokenizerFast

    folder = root / "grammar-tokenizer-49k"
    if not (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from engines.testing.tiny import SPECIAL_TOKENS

        files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        tok.train_from_iterator(_texts(files), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
        fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _texts(files: list[str]) -> Any:
    for name in files:
        if "site-packages" not in name:
            yield Path(name).read_bytes().decode("utf-8", errors="replace")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_llguidance(tokenizer: Any, tokens: list[int]) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    mask = llguidance.torch.allocate_token_bitmask(1, len(tokenizer))

    def compile_first() -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        matcher = llguidance.LLMatcher(lltok, grammar)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        return matcher

    compile_s, matcher = timed(compile_first)
    steps = []
    for token in tokens:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        ok = matcher.consume_token(token)
        steps.append(time.perf_counter() - start)
        assert ok, matcher.get_error()
    return {"compile_ms": compile_s * 1e3, **_step_stats(steps)}


def bench_xgrammar(tokenizer: Any, tokens: list[int]) -> dict[str, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compile_s, compiled = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), strict_mode=True))
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    steps = []
    for token in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        ok = matcher.accept_token(token)
        steps.append(time.perf_counter() - start)
        assert ok
    return {"compile_ms": compile_s * 1e3, **_step_stats(steps)}


def bench_outlines_core(tokenizer: Any, tokens: list[int]) -> dict[str, float]:
    import outlines_core

    eos = tokenizer.eos_token_id
    vocab: dict[str, list[int]] = {}
    for text, token in tokenizer.get_vocab().items():
        if token != eos and token not in tokenizer.all_special_ids:
            vocab.setdefault(text, []).append(token)
    vocabulary = outlines_core.Vocabulary(eos, vocab)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    compile_s, index = timed(lambda: outlines_core.Index(regex, vocabulary))
    guide = outlines_core.Guide(index)
    steps = []
    for token in tokens:
        start = time.perf_counter()
        allowed = guide.get_tokens()
        guide.advance(token)
        steps.append(time.perf_counter() - start)
        assert allowed
    return {"compile_ms": compile_s * 1e3, **_step_stats(steps)}


def bench_engine_overhead(tokenizer: Any, tokens: list[int]) -> dict[str, float]:
    """The gateway's own per-token cost: a free sampler step vs mask + masked step + advance (llguidance)."""
    import torch

    from engines.grammar import Constraint, GrammarCache
    from engines.sampling import Sampler, SamplingParams

    compiled = GrammarCache().compile(
        tokenizer, Constraint.json_schema(SCHEMA), frozenset({tokenizer.eos_token_id})
    )
    matcher = compiled.matcher()
    sampler = Sampler(SamplingParams(temperature=0.0))  # greedy: the mask, not the RNG, is measured
    logits = torch.randn(len(tokenizer))
    free, constrained = [], []
    for _ in tokens:  # two separate loops: interleaving them measured each one's cache misses twice
        start = time.perf_counter()
        sampler.choose(logits)
        free.append(time.perf_counter() - start)
    for token in tokens:
        start = time.perf_counter()
        sampler.choose(logits, matcher.allowed(len(tokenizer)))
        matcher.consume(token)
        constrained.append(time.perf_counter() - start)
    return {
        "free_step_p50_us": statistics.median(free) * 1e6,
        "constrained_step_p50_us": statistics.median(constrained) * 1e6,
        "overhead_p50_us": (statistics.median(constrained) - statistics.median(free)) * 1e6,
        "overhead_mean_us": (statistics.fmean(constrained) - statistics.fmean(free)) * 1e6,
    }


def _step_stats(steps: list[float]) -> dict[str, float]:
    return {
        "step_p50_us": statistics.median(steps) * 1e6,
        "step_mean_us": statistics.fmean(steps) * 1e6,
        "tokens": float(len(steps)),
    }


def main() -> None:
    import torch

    # One sampler step is too small to gain from threads; on a shared machine a preempted second
    # thread only adds stalls. The gateway's engine thread sets its own count (``[engine] threads``).
    torch.set_num_threads(1)
    tokenizer = bench_tokenizer()
    text = json.dumps(INSTANCE, separators=(",", ":"))
    tokens = tokenizer.encode(text, add_special_tokens=False)
    print(f"vocabulary {len(tokenizer)}, instance {len(text)} chars = {len(tokens)} tokens")
    results: dict[str, dict[str, float]] = {}
    # First, before any other library has started its own thread pools on these two cores.
    spaced = tokenizer.encode(json.dumps(INSTANCE), add_special_tokens=False)  # the gateway's separators
    results["engine"] = overhead = bench_engine_overhead(tokenizer, spaced)
    print(
        f"engine sampler step, 49k vocab: free {overhead['free_step_p50_us']:.1f} us, constrained "
        f"{overhead['constrained_step_p50_us']:.1f} us (p50): +{overhead['overhead_p50_us']:.1f} us p50, "
        f"+{overhead['overhead_mean_us']:.1f} us mean per token"
    )
    for name, fn in (
        ("llguidance", bench_llguidance),
        ("xgrammar", bench_xgrammar),
        ("outlines-core", bench_outlines_core),
    ):
        try:
            results[name] = fn(tokenizer, tokens)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})", file=sys.stderr)
            continue
        r = results[name]
        print(
            f"{name:14s} compile {r['compile_ms']:9.1f} ms   step p50 {r['step_p50_us']:8.1f} us"
            f"   mean {r['step_mean_us']:8.1f} us"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "grammar.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
