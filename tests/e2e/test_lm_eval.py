"""lm-eval's ``local-completions`` runs a multiple-choice task against the gateway and gets the
loglikelihoods a plain transformers forward gives.

The task and its data are local files (``dataset_path: json``), so nothing is downloaded; lm-eval
sends token-id prompts with ``echo: true, logprobs: 1, max_tokens: 1`` and sums the prompt logprobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer, TinyModels

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOCS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs has a cat?", "choices": ["two", "four"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["stone", "apple", "chair"], "answer": 1},
]

TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def expected_loglikelihoods(base: Path, adapter: Path | None) -> list[list[float]]:
    """lm-eval's own split of context and continuation, scored with transformers (and peft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    results = []
    with torch.inference_mode():
        for doc in DOCS:
            context = f"Question: {doc['question']}\nAnswer:"
            row = []
            for choice in doc["choices"]:
                whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
                ctxlen = len(tokenizer(context, add_special_tokens=False)["input_ids"])
                logits = model(torch.tensor([whole])).logits[0].float()
                rows = torch.log_softmax(logits, dim=-1)
                row.append(sum(rows[i - 1, whole[i]].item() for i in range(ctxlen, len(whole))))
            results.append(row)
    return results


def test_lm_eval_local_completions_multiple_choice(
    tiny_server: RunningServer, tiny_models: TinyModels, tmp_path: Path
) -> None:
    model = "tiny+tiny-lora"  # the adapter changes every logprob, so a base-only answer would not match
    pytest.importorskip("lm_eval")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=data))
    output = tmp_path / "out"
    model_args = ",".join(
        [
            f"model={model}",
            f"base_url={tiny_server.v1}/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={tiny_models.base}",
            "max_length=256",
            "max_retries=1",
        ]
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": "x"}
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(output)]
    command += ["--log_samples"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    samples = [json.loads(line) for path in output.rglob("samples_tiny_mc_*.jsonl") for line in path.open()]
    assert len(samples) == len(DOCS)
    got = {
        sample["doc_id"]: [float(resp[0][0]) for resp in sample["resps"]]
        for sample in samples  # resps: one [[loglikelihood, is_greedy]] per choice
    }
    adapter = tiny_models.adapter if "+" in model else None
    expected = expected_loglikelihoods(tiny_models.base, adapter)
    for doc_id, row in enumerate(expected):
        assert all(value < 0 for value in row)
        assert got[doc_id] == pytest.approx(row, abs=1e-3)
