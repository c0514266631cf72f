"""Convert the SmolLM2-shaped benchmark model to GGUF (f32 and q8_0) for llama.cpp's server.

Run:  python -m bench.gguf --llama-cpp PATH/TO/llama.cpp [--out DIR]
      python -m bench.gguf --llama-cpp PATH --model CHECKPOINT_DIR --types q8_0 --out DIR
          (another checkpoint, for example bench.real_size's 7B-shaped one)

``PATH/TO/llama.cpp`` is a llama.cpp source tree (for example the one vendored in the
``llama-cpp-python`` sdist: ``pip download --no-deps --no-binary :all: llama-cpp-python``). Its
``convert_hf_to_gguf.py`` identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a test
string and refuses ones it does not know; the benchmark model's tokenizer is trained locally (the Hub is
not reachable), so it is declared ``gpt-2`` (byte-level BPE, which it is). The weights are converted
as they are. Prints the two files' paths; ``python -m bench.cpu_speed --llama-server ...`` serves them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped


def convert(llama_cpp: Path, model: Path, out: Path, outtype: str) -> None:
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    import conversion.base
    import conversion.llama
    import convert_hf_to_gguf

    def byte_level_bpe(self: Any, tokenizer: Any) -> str:
        return "gpt-2"

    def gpt2_vocab(self: Any) -> None:  # Llama's converter tries sentencepiece files first
        import gguf

        tokens, toktypes, tokpre = self.get_vocab_base()
        self.gguf_writer.add_tokenizer_model("gpt2")
        self.gguf_writer.add_tokenizer_pre(tokpre)
        self.gguf_writer.add_token_list(tokens)
        self.gguf_writer.add_token_types(toktypes)
        special_vocab = gguf.SpecialVocab(self.dir_model, load_merges=True)
        # The tokenizer is bytes only (no merges), and llama.cpp refuses a BPE vocabulary without
        # merges: one merge of two NUL bytes, which no benchmark prompt contains.
        special_vocab.merges = special_vocab.merges or ["\u0100 \u0100"]
        special_vocab.add_to_gguf(self.gguf_writer)

    conversion.base.TextModel.get_vocab_base_pre = byte_level_bpe
    conversion.llama.LlamaModel.set_vocab = gpt2_vocab
    sys.argv = ["convert_hf_to_gguf.py", str(model), "--outtype", outtype, "--outfile", str(out)]
    convert_hf_to_gguf.main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree")
    parser.add_argument(
        "--out", type=Path, default=Path.home() / ".cache" / "peft-gateway" / "bench" / "gguf"
    )
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: the SmolLM2-shaped model)")
    parser.add_argument("--name", help="file name stem (default: the model folder's name)")
    parser.add_argument("--types", nargs="+", default=["f32", "q8_0"], choices=["f32", "bf16", "q8_0"])
    args = parser.parse_args(argv)
    model = args.model if args.model is not None else ensure_smollm2_shaped()[0]
    name = args.name or ("smollm2-135m-shaped" if args.model is None else args.model.resolve().name)
    args.out.mkdir(parents=True, exist_ok=True)
    for outtype in args.types:
        target = args.out / f"{name}-{outtype}.gguf"
        if not target.exists():
            convert(args.llama_cpp, model, target, outtype)
        print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
